# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Gradient-accumulation fusion without apex (megatron/core/tensor_parallel/wgrad_accumulation.py):
Megatron's linears accept ``gradient_accumulation_fusion`` and add the weight gradient into
``main_grad`` (float32 or 16-bit) with one GEMM, against float64 references."""

import pytest
import torch

from megatron.core.tensor_parallel import layers, wgrad_accumulation
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)

APEX = pytest.mark.skipif(
    layers.fused_weight_gradient_mlp_cuda is not wgrad_accumulation,
    reason="apex's fused_weight_gradient_mlp_cuda is installed: the PyTorch fallback is unused",
)


def _inputs(tokens, n_in, n_out, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen).to(device, dtype)
    grad_output = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    main_grad = torch.randn(n_out, n_in, generator=gen).to(device)  # float32, not zero
    return x, grad_output, main_grad


def _float32_bound(x, grad_output, tokens):
    """float32 rounding of a sum of ``tokens`` exact products (16-bit inputs) and one addition:
    ``tokens`` ulps of the largest partial sum, generously."""
    largest = tokens * x.abs().max().double() * grad_output.abs().max().double()
    return (tokens + 2) * torch.finfo(torch.float32).eps * largest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp32_main_grad_accumulates_the_weight_gradient(dtype):
    x, grad_output, main_grad = _inputs(24, 12, 10, dtype, "cpu")
    want = main_grad.double() + grad_output.double().t() @ x.double()
    wgrad_accumulation.wgrad_gemm_accum_fp32(x, grad_output, main_grad)
    assert main_grad.dtype == torch.float32
    assert (main_grad.double() - want).abs().max() <= _float32_bound(x, grad_output, 24)


def test_16_bit_main_grad_accumulates_in_its_dtype():
    x, grad_output, main_grad = _inputs(24, 12, 10, torch.bfloat16, "cpu")
    main_grad = main_grad.bfloat16()
    expected = main_grad.clone().addmm_(grad_output.t(), x)
    wgrad_accumulation.wgrad_gemm_accum_fp16(x, grad_output, main_grad)
    assert torch.equal(main_grad, expected)


def _config(**overrides):
    values = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=True,
        params_dtype=torch.bfloat16,
        bf16=True,
    )
    values.update(overrides)
    return TransformerConfig(**values)


@APEX
@pytest.mark.parametrize("kind", ["column", "row"])
def test_linears_accept_the_fusion_and_add_into_main_grad(single_rank, kind):
    """Upstream refused gradient_accumulation_fusion without apex (RuntimeError in the
    constructor); now the weight gradient lands in main_grad and the weight gets none."""
    config = _config()
    init = torch.nn.init.xavier_normal_
    if kind == "column":
        layer = ColumnParallelLinear(
            16, 20, config=config, init_method=init, bias=False, gather_output=False
        )
    else:
        layer = RowParallelLinear(
            16,
            20,
            config=config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )
    layer = layer.to(single_rank)
    x, grad_output, main_grad = _inputs(6, 16, 20, torch.bfloat16, single_rank, seed=4)
    layer.weight.main_grad = main_grad.clone()
    inp = x.view(3, 2, 16).requires_grad_()
    out, _ = layer(inp)
    out.backward(grad_output.view(3, 2, 20))
    want = main_grad.double() + grad_output.double().t() @ x.double()
    got = layer.weight.main_grad.double()
    assert (got - want).abs().max() <= _float32_bound(x, grad_output, 6)
    assert layer.weight.grad is None
    # the unfused path rounds the weight gradient to bf16 first: not what the fusion computed
    unfused = main_grad.double() + (grad_output.t() @ x).double()
    assert not torch.equal(got, unfused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp32_main_grad_accumulates_in_place(dtype):
    """On CUDA the GEMM writes into main_grad itself (addmm with out_dtype, out=main_grad): what
    was there must stay added, at a Falcon-H1 projection's size."""
    x, grad_output, main_grad = _inputs(8192, 1024, 2048, dtype, "cuda")
    before = main_grad.data_ptr()
    want = main_grad.double() + grad_output.double().t() @ x.double()
    wgrad_accumulation.wgrad_gemm_accum_fp32(x, grad_output, main_grad)
    assert main_grad.data_ptr() == before
    # float32 accumulation of 8192 products of unit-variance values: ~1e-4 absolute typical,
    # against sums of magnitude ~90; a dropped main_grad (magnitude 1) or a 16-bit rounding of
    # the product (~0.35) are far outside
    assert (main_grad.double() - want).abs().max() < 2e-2
