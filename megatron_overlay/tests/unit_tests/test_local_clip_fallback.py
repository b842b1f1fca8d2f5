# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Gradient clipping without Transformer Engine or Apex (upstream's local fallbacks).

``local_multi_tensor_l2_norm``: the same bits as building a host tensor from the per-tensor
norms, with one host read instead of one per tensor (each read synchronises with the device on a
GPU; on the CPU, where the per-tensor reads do not go through the dispatcher, only the bits are
checked). ``local_multi_tensor_scale`` in place: one multi-tensor multiply with the bits of a
product and a copy per tensor."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core.utils import (
    local_multi_tensor_applier,
    local_multi_tensor_l2_norm,
    local_multi_tensor_scale,
)


def _reference(tensor_lists):
    """The norm as defined before: a host tensor built from each tensor's norm."""
    per_tensor = [[torch.norm(t) for t in tensor_list] for tensor_list in tensor_lists]
    return torch.tensor([float(torch.norm(torch.tensor(per_tensor)))], dtype=torch.float)


def _tensors(count, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 3000, (count,), generator=generator).tolist()
    return [
        (torch.randn(n, generator=generator) * (i + 1) / 7).to(dtype) for i, n in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    "tensor_lists",
    [
        [_tensors(37, torch.float32, 0)],
        [_tensors(23, torch.bfloat16, 1)],
        [_tensors(11, torch.float64, 2)],
        [_tensors(5, torch.bfloat16, 3) + _tensors(6, torch.float32, 4)],
        [_tensors(9, torch.float32, 5), _tensors(9, torch.float32, 6)],
        [[]],
        [],
    ],
    ids=["fp32", "bf16", "fp64", "mixed_dtypes", "two_lists", "empty_list", "no_lists"],
)
def test_same_bits_as_the_per_tensor_host_tensor(tensor_lists):
    norm, per_tensor = local_multi_tensor_applier(
        local_multi_tensor_l2_norm, torch.zeros(1, dtype=torch.int), tensor_lists, False
    )
    assert per_tensor is None
    expected = _reference(tensor_lists)
    assert norm.dtype == expected.dtype and torch.equal(norm.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_device_synchronisation_for_any_number_of_tensors():
    """On a GPU the norm reads the 40 per-tensor norms in one copy (before: one read each), and
    keeps the bits of the per-tensor host tensor."""
    tensors = [t.cuda() for t in _tensors(40, torch.float32, 7)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            norm, _ = local_multi_tensor_l2_norm(2048 * 32, None, [tensors], False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    # The stacked norms' copy to the host, and at most the copy of the result back.
    assert 1 <= len(syncs) <= 2, syncs
    assert norm.is_cuda and torch.equal(norm.cpu(), _reference([tensors]))


class _CountOps(TorchDispatchMode):
    """The aten operators dispatched while active, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _mixed(seed):
    return _tensors(7, torch.float32, seed) + _tensors(5, torch.bfloat16, seed + 1)


@pytest.mark.parametrize("scale", [0.37, 1.0, 3.0e-5])
@pytest.mark.parametrize("dtypes", ["float32", "mixed"])
def test_scale_in_place_keeps_the_per_tensor_bits(scale, dtypes):
    """float32 gradients (what clipping scales) in one multi-tensor multiply, others in one
    multiply each; either way the bits of ``src * scale`` copied back."""
    grads = _tensors(12, torch.float32, 10) if dtypes == "float32" else _mixed(10)
    expected = [g * scale for g in grads]
    with _CountOps() as mode:
        local_multi_tensor_applier(local_multi_tensor_scale, None, [grads, grads], scale)
    if dtypes == "float32":
        assert mode.ops == [torch.ops.aten._foreach_mul_.Scalar]
    else:
        assert mode.ops == [torch.ops.aten.mul_.Tensor] * len(grads)
    assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(grads, expected))


def test_scale_into_other_tensors_still_copies():
    """Distinct destinations (the optimizer's copies between parameter lists) keep their dtype
    and receive the scaled sources; the sources stay."""
    srcs = _mixed(20)
    before = [s.clone() for s in srcs]
    dsts = [torch.empty_like(s, dtype=torch.float32) for s in srcs]
    local_multi_tensor_applier(local_multi_tensor_scale, None, [srcs, dsts], 0.5)
    assert all(torch.equal(s, b) for s, b in zip(srcs, before))
    assert all(
        d.dtype == torch.float32 and torch.equal(d, (s * 0.5).float()) for s, d in zip(srcs, dsts)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scale_in_place_on_the_gpu_keeps_the_bits():
    for grads in (
        [g.cuda() for g in _tensors(12, torch.float32, 30)],
        [g.cuda() for g in _mixed(30)],
    ):
        expected = [g * 0.37 for g in grads]
        local_multi_tensor_scale(2048 * 32, None, [grads, grads], 0.37)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected))
