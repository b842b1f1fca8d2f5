# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Gradient clipping without Transformer Engine or Apex while a CUDA graph captures
(``megatron/core/multi_tensor_on_device.py``).

* The on-device norm and tensor scale: exact on exactly representable values, within a relative
  1e-6 of the host path on random float32 gradients, the scale with the host path's bits, and no
  host read (which the host path does, so the counter can fail).
* ``get_grad_norm_fp32`` / ``clip_grad_by_total_norm_fp32`` with the local fallbacks: outside
  capture the norm is the host path's float; while "capturing" (forced on the CPU) it is a device
  tensor, nothing is read on the host, and the clipped gradients match the host path's.
* On a GPU (marked ``gpu``): the same clipping captured in a real CUDA graph and replayed on new
  gradients.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core import parallel_state
from megatron.core import utils as core_utils
from megatron.core.multi_tensor_on_device import (
    multi_tensor_l2_norm_on_device,
    multi_tensor_scale_by_tensor,
    stream_capturing,
)
from megatron.core.optimizer import clip_grads
from megatron.core.utils import (
    local_multi_tensor_applier,
    local_multi_tensor_l2_norm,
    local_multi_tensor_scale,
)
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.test_local_clip_fallback import _tensors

# aten ops whose result the host needs (on a GPU each synchronises with the device).
HOST_READS = {
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.nonzero.default",
}
NOOP = torch.zeros(1, dtype=torch.int)


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _float64_norm(tensor_lists):
    return math.sqrt(sum(float(t.double().square().sum()) for ts in tensor_lists for t in ts))


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_norm_on_device_is_exact_on_representable_values(dtype, out_dtype):
    # Norms 5 and 12 (exact in every dtype), total 13, in one list or two.
    for lists in ([[torch.tensor([3.0, 4.0]), torch.tensor([12.0])]],
                  [[torch.tensor([3.0, 4.0])], [], [torch.tensor([0.0, 12.0])]]):  # fmt: skip
        lists = [[t.to(dtype) for t in ts] for ts in lists]
        norm, per_tensor = multi_tensor_l2_norm_on_device(2048, NOOP, lists, False)
        assert per_tensor is None
        assert norm.dtype == out_dtype and norm.shape == (1,)
        assert norm.item() == 13.0


def test_norm_on_device_of_nothing_is_zero():
    for lists in ([], [[]], [[], []]):
        norm, _ = multi_tensor_l2_norm_on_device(2048, NOOP, lists, False)
        assert norm.dtype == torch.float32 and torch.equal(norm, torch.zeros(1))


@pytest.mark.parametrize(
    "tensor_lists",
    [
        [_tensors(37, torch.float32, 0)],
        [_tensors(9, torch.float32, 5), _tensors(9, torch.float32, 6)],
        [_tensors(6, torch.float64, 2) + _tensors(5, torch.float32, 4)],
    ],
    ids=["fp32", "two_lists", "mixed_dtypes"],
)
def test_norm_on_device_matches_the_host_path(tensor_lists):
    ours, _ = multi_tensor_l2_norm_on_device(2048, NOOP, tensor_lists, False)
    host, _ = local_multi_tensor_l2_norm(2048, NOOP, tensor_lists, False)
    exact = _float64_norm(tensor_lists)
    # Different summation orders (multi-tensor per-tensor norms, a device reduction of them):
    # float32 rounding, well inside 1e-6 relative for these 11-37 tensors.
    assert ours.item() == pytest.approx(exact, rel=1e-6)
    assert ours.item() == pytest.approx(host.item(), rel=1e-6)


def test_norm_on_device_reads_nothing_on_the_host():
    tensor_lists = [_tensors(12, torch.float32, 7)]
    with HostReads() as reads:
        multi_tensor_l2_norm_on_device(2048, NOOP, tensor_lists, False)
    assert reads.count == 0
    with HostReads() as reads:
        local_multi_tensor_l2_norm(2048, NOOP, tensor_lists, False)
    assert reads.count >= 1  # the host path reads the norm: the counter sees reads


def test_local_l2_norm_keeps_its_host_path_outside_capture(monkeypatch):
    tensor_lists = [_tensors(12, torch.float32, 8)]
    before, _ = local_multi_tensor_l2_norm(2048, NOOP, tensor_lists, False)
    monkeypatch.setattr(core_utils, "stream_capturing", lambda: True)
    with HostReads() as reads:
        captured, _ = local_multi_tensor_l2_norm(2048, NOOP, tensor_lists, False)
    assert reads.count == 0
    expected, _ = multi_tensor_l2_norm_on_device(2048, NOOP, tensor_lists, False)
    assert torch.equal(captured, expected)
    assert captured.item() == pytest.approx(before.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [0.37, 3e-5, 1.0])
def test_scale_by_tensor_has_the_host_paths_bits(dtype, value):
    scale = torch.tensor([value], dtype=torch.float32)
    as_float = float(scale)  # the scale the host path would multiply with
    ours = _tensors(9, dtype, 11)
    host = [t.clone() for t in ours]
    with HostReads() as reads:
        multi_tensor_scale_by_tensor(2048, NOOP, [ours, ours], scale)
    assert reads.count == 0
    local_multi_tensor_scale(2048, NOOP, [host, host], as_float)
    for a, b in zip(ours, host):
        assert a.dtype == dtype and torch.equal(a, b)


def _bf16_product(device):
    # 3 x (1 + 2^-8 - 2^-12) = 3.011: 3.015625 in bfloat16; with the scale rounded to bfloat16
    # first (1.0) it would stay 3.0.
    tensor = torch.tensor([3.0], dtype=torch.bfloat16, device=device)
    scale = torch.tensor([1.0 + 2.0**-8 - 2.0**-12], device=device)
    multi_tensor_scale_by_tensor(2048, NOOP, [[tensor], [tensor]], scale)
    return tensor


def test_scale_by_tensor_rounds_a_bf16_product_once():
    """The product is the float32 one rounded once to bfloat16, not one with the scale rounded
    to bfloat16 first."""
    tensor = _bf16_product("cpu")
    assert tensor.dtype == torch.bfloat16 and tensor.item() == 3.015625


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_scale_by_tensor_rounds_a_bf16_product_once_on_a_gpu():
    tensor = _bf16_product("cuda")
    assert tensor.dtype == torch.bfloat16 and tensor.item() == 3.015625


def test_scale_by_tensor_into_other_tensors():
    srcs = _tensors(5, torch.float32, 12)
    dsts = [torch.full_like(t, 9.0) for t in srcs]
    multi_tensor_scale_by_tensor(2048, NOOP, [srcs, dsts], torch.tensor([0.5]))
    for src, dst in zip(srcs, dsts):
        assert torch.equal(dst, src * 0.5)
    with pytest.raises(ValueError, match="2 source tensors for 1 destinations"):
        multi_tensor_scale_by_tensor(2048, NOOP, [srcs[:2], dsts[:1]], torch.tensor([0.5]))


def test_not_capturing_without_cuda():
    if not torch.cuda.is_available():
        assert stream_capturing() is False
    else:
        assert stream_capturing() is (torch.cuda.is_current_stream_capturing())


@pytest.fixture
def local_kernels(monkeypatch):
    """Gradient clipping with Megatron's local fallbacks (as without TE or Apex), also where
    TE is installed."""
    monkeypatch.setattr(clip_grads, "multi_tensor_applier", local_multi_tensor_applier)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", local_multi_tensor_scale)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_tensor_impl", None)


def _force_capturing(monkeypatch):
    monkeypatch.setattr(core_utils, "stream_capturing", lambda: True)
    monkeypatch.setattr(clip_grads, "stream_capturing", lambda: True)


def _params(device, seed, scale=1.0):
    params = []
    for t in _tensors(13, torch.float32, seed):
        param = torch.nn.Parameter(torch.zeros_like(t, device=device))
        param.grad = t.to(device) * scale
        params.append(param)
    return params


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clipping_while_capturing_matches_the_host_path(
    single_rank, local_kernels, monkeypatch, max_norm
):
    device = single_rank
    group = parallel_state.get_model_parallel_group()
    host_params, params = _params(device, 3), _params(device, 3)
    host_norm = clip_grads.get_grad_norm_fp32(
        [p.grad for p in host_params], grad_stats_parallel_group=group
    )
    assert isinstance(host_norm, float)
    clip_grads.clip_grad_by_total_norm_fp32(host_params, max_norm, host_norm)

    _force_capturing(monkeypatch)
    with HostReads() as reads:
        norm = clip_grads.get_grad_norm_fp32(
            [p.grad for p in params], grad_stats_parallel_group=group
        )
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm, norm)
    assert reads.count == 0
    assert isinstance(norm, torch.Tensor) and norm.device == device and norm.shape == (1,)
    assert norm.item() == pytest.approx(host_norm, rel=1e-6)
    assert norm.item() > 1.0  # so max_norm 1.0 clips
    unclipped = [p.grad for p in _params(device, 3)]
    for ours, host, before in zip(params, host_params, unclipped):
        if max_norm > norm.item():  # coefficient clamped to 1: unchanged in both
            assert torch.equal(ours.grad, before) and torch.equal(host.grad, before)
        else:
            assert not torch.equal(ours.grad, before)
            torch.testing.assert_close(ours.grad, host.grad, rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_clipping_captured_in_a_cuda_graph(single_rank, local_kernels):
    """Without TE's kernels: capture the norm and the clipping, replay them on new gradients
    copied into the captured ones, compare with the host path on the same gradients."""
    device = single_rank
    group = parallel_state.get_model_parallel_group()
    params = _params(device, 4)
    grads = [p.grad for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as graph capture requires
        clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=group)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=group)
        clip_grads.clip_grad_by_total_norm_fp32(params, 1.0, norm)
    for seed, scale in ((5, 1.0), (6, 1e-4)):
        fresh = _params(device, seed, scale)
        for grad, new in zip(grads, fresh):
            grad.copy_(new.grad)
        graph.replay()
        torch.cuda.synchronize()
        host_norm = clip_grads.get_grad_norm_fp32(
            [p.grad for p in fresh], grad_stats_parallel_group=group
        )
        clip_grads.clip_grad_by_total_norm_fp32(fresh, 1.0, host_norm)
        assert norm.item() == pytest.approx(host_norm, rel=1e-6)
        for grad, new in zip(grads, fresh):
            torch.testing.assert_close(grad, new.grad, rtol=1e-6, atol=0)
