# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""``main_grad += grad`` of the data-parallel wrapper's backward hooks in one Triton pass
(megatron/core/fusions/fused_grad_accumulation.py): the bits of ``main_grad.add_(grad)``, and
the hook uses it under CUDA graphs. On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, as
``make test`` sets)."""

import inspect

import pytest
import torch

from megatron.core.distributed import distributed_data_parallel
from megatron.core.fusions import fused_grad_accumulation, triton_support
from megatron.core.fusions.fused_grad_accumulation import triton_accumulate_
from tests.unit_tests.fusions.triton_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_support.INTERPRET,
    reason="no GPU: run with TRITON_INTERPRET=1 (Triton's CPU interpreter), as `make test` does",
)


def _tensors(numel, dtype, seed=0):
    """A float32 accumulator and a gradient spanning many binades (sums that round, cancel,
    and -0.0 + 0.0)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-30, 10, (numel,), generator=gen).float())
    main = torch.randn(numel, generator=gen) * scale
    grad = (torch.randn(numel, generator=gen) * scale).to(dtype)
    main[0], grad[0] = -0.0, 0.0
    if numel > 1:
        main[1] = -grad[1].float()
    return main.to(DEVICE), grad.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1, 1000, 4096, 9001])
def test_accumulates_the_bits_of_add(dtype, numel):
    main, grad = _tensors(numel, dtype)
    expected = main.clone().add_(grad)
    out = triton_accumulate_(main, grad)
    assert out is main
    assert torch.equal(main.view(torch.int32), expected.view(torch.int32))


def test_bad_inputs_name_what_is_allowed():
    main, grad = _tensors(16, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous float32 main_grad"):
        triton_accumulate_(main.bfloat16(), grad)
    with pytest.raises(ValueError, match="as many elements"):
        triton_accumulate_(main, grad[:8])


@pytest.mark.parametrize("graphed", [True, False])
def test_dispatch_takes_the_kernel_for_graphed_cuda_steps_only(monkeypatch, graphed):
    calls = []
    monkeypatch.setattr(
        fused_grad_accumulation, "triton_accumulate_", lambda m, g: calls.append(m.device)
    )
    main, grad = _tensors(8, torch.bfloat16)
    expected = main.clone().add_(grad)
    fused_grad_accumulation.accumulate_grad(main, grad, graphed=graphed)
    if DEVICE == "cuda" and graphed:
        assert calls == [main.device]
    else:  # eager steps and CPU tensors keep PyTorch's add (also under the interpreter)
        assert calls == [] and torch.equal(main, expected)


def test_the_data_parallel_hook_accumulates_through_it():
    """The backward hook of DistributedDataParallel adds each gradient with accumulate_grad."""
    assert distributed_data_parallel.accumulate_grad is fused_grad_accumulation.accumulate_grad
    source = distributed_data_parallel.DistributedDataParallel._make_backward_post_hook
    text = inspect.getsource(source)
    assert "accumulate_grad(" in text and "graphed=self.config.cuda_graph_impl" in text
    assert "main_grad.add_(" not in text


_COMPILE_KERNEL = """
from megatron.core.fusions.fused_grad_accumulation import _accumulate_kernel

for dtype in ("bf16", "fp16", "fp32"):
    signature = {"main_ptr": "*fp32", "grad_ptr": f"*{dtype}", "numel": "i32", "BLOCK": "constexpr"}
    compile_for_hopper(_accumulate_kernel, signature, {"BLOCK": 4096})
"""


def test_kernel_compiles_for_hopper():
    """The kernel compiles to sm_90 machine code for every gradient dtype (no GPU needed)."""
    assert_compiles_for_hopper(_COMPILE_KERNEL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_in_proj_weight_gradient():
    """Compiled kernel at the 0.5B mamba_in_proj weight (3352 x 1024), bf16 into float32."""
    main, grad = _tensors(3352 * 1024, torch.bfloat16)
    expected = main.clone().add_(grad)
    triton_accumulate_(main, grad)
    assert torch.equal(main.view(torch.int32), expected.view(torch.int32))
