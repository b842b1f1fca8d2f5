# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""The Triton row scale (megatron/core/fusions/fused_row_scale_triton.py) gives the bits of
PyTorch's ``weight * scale[:, None]``, forward and backward, and ``scale_weight`` of the
Falcon-H1 multipliers uses it for CUDA weights. On CPU the kernel runs in Triton's interpreter
(``TRITON_INTERPRET=1``, as ``make test`` sets)."""

import pytest
import torch

from megatron.core.fusions import triton_support
from megatron.core.fusions.fused_row_scale_triton import (
    row_scaled,
    scale_rows,
    scale_rows_accumulate_,
)
from megatron.core.transformer import forward_multipliers
from tests.unit_tests.fusions.triton_compile import assert_compiles_for_hopper
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_support.INTERPRET,
    reason="no GPU: run with TRITON_INTERPRET=1 (Triton's CPU interpreter), as `make test` does",
)
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _inputs(rows, cols, dtype, seed=0):
    """A weight with values spread over many binades (rounding ties and subnormal products
    included) and scales like Falcon-H1's multipliers, also exact powers of two and zero."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.exp2(
        torch.randint(-20, 8, (rows, cols), generator=gen).float()
    )
    scale = torch.rand(rows, generator=gen) * 4 + 0.05
    scale[0], scale[-1] = 0.5, 0.0
    return weight.to(dtype).to(DEVICE), scale.to(dtype).to(DEVICE)


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 33), (3, 1024), (5, 2500), (1, 1)], ids=str)
def test_forward_and_backward_are_the_pytorch_product_bit_for_bit(dtype, shape):
    weight, scale = _inputs(*shape, dtype)
    grad_out = _inputs(*shape, dtype, seed=1)[0]
    w = weight.clone().requires_grad_()
    out = row_scaled(w, scale)
    out.backward(grad_out)
    ref_w = weight.clone().requires_grad_()
    ref = ref_w * scale.unsqueeze(1)
    ref.backward(grad_out)
    assert _same_bits(out.detach(), ref.detach())
    assert _same_bits(w.grad, ref_w.grad)


def test_bad_inputs_name_what_is_allowed():
    weight, scale = _inputs(4, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="one scale per row in its dtype"):
        scale_rows(weight, scale.float())
    with pytest.raises(ValueError, match="2-D matrix"):
        scale_rows(weight.view(2, 2, 8), scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 33), (5, 2500), (1, 1)], ids=str)
def test_scaled_accumulation_is_scaling_then_adding_bit_for_bit(dtype, shape):
    """``main_grad += scale_rows(grad, scale)`` in one pass: the product rounded to the
    gradient's dtype, then a float32 add, as the two kernels it replaces compute it."""
    grad, scale = _inputs(*shape, dtype)
    main = _inputs(*shape, torch.float32, seed=2)[0]
    expected = main + scale_rows(grad, scale).float()
    assert scale_rows_accumulate_(main, grad, scale) is main
    assert _same_bits(main, expected)
    with pytest.raises(ValueError, match="contiguous float32 main_grad"):
        scale_rows_accumulate_(main.bfloat16(), grad, scale)


def _parameter_with_main_grad(weight, seed=4):
    """A parameter as the data-parallel wrapper leaves it: a float32 ``main_grad`` holding
    earlier micro-batches' gradients and ``grad_added_to_main_grad`` reset."""
    param = torch.nn.Parameter(weight.clone())
    param.main_grad = _inputs(*weight.shape, torch.float32, seed=seed)[0]
    param.grad_added_to_main_grad = False
    return param


@pytest.mark.parametrize("zero_out_wgrad", [False, True])
def test_backward_adds_into_main_grad_under_the_data_parallel_protocol(zero_out_wgrad):
    """For a parameter with a ``main_grad`` (the data-parallel wrapper's), the backward adds
    the scaled gradient into it (bits of scaling, then the wrapper's add), marks the
    parameter ``grad_added_to_main_grad`` and hands autograd a placeholder of its shape; the
    wrapper's hook then skips it. With ``zero_out_wgrad`` (the hook adds whatever gradient it
    gets), and for a plain tensor, the gradient is returned as before."""
    weight, scale = _inputs(6, 40, torch.bfloat16)
    grad_out = _inputs(6, 40, torch.bfloat16, seed=1)[0]
    param = _parameter_with_main_grad(weight)
    param.zero_out_wgrad = zero_out_wgrad
    before = param.main_grad.clone()
    row_scaled(param, scale).backward(grad_out)
    scaled = scale_rows(grad_out, scale)
    if zero_out_wgrad:
        assert torch.equal(param.main_grad, before) and not param.grad_added_to_main_grad
        assert _same_bits(param.grad, scaled)
    else:
        assert _same_bits(param.main_grad, before + scaled.float())
        assert param.grad_added_to_main_grad is True
        assert param.grad.shape == param.shape  # placeholder, never read


def test_data_parallel_wrapper_accumulates_the_fused_gradient_once(single_rank):
    """Megatron's DistributedDataParallel around a module whose weight is row-scaled: two
    micro-batches accumulate into the grad buffer exactly what scaling every gradient and adding
    it does (the hook does not add the placeholder)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True
    )
    weight, scale = _inputs(6, 40, torch.bfloat16)
    inputs = [_inputs(3, 40, torch.bfloat16, seed=s)[0] for s in (5, 6)]

    class RowScaled(MegatronModule):
        def __init__(self, fused):
            super().__init__(config)
            self.weight = torch.nn.Parameter(weight.clone())
            self.fused = fused

        def forward(self, x):
            scaled = row_scaled(self.weight, scale) if self.fused else self.weight * scale[:, None]
            return x @ scaled.t()

    grads = {}
    for fused in (True, False):
        model = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            RowScaled(fused).to(DEVICE),
        )
        model.zero_grad_buffer()
        for x in inputs:
            model(x.to(DEVICE)).float().pow(2).sum().backward()
        grads[fused] = model.module.weight.main_grad.clone()
        assert model.module.weight.grad is None  # the hook consumed it
    assert _same_bits(grads[True], grads[False])
    assert grads[True].abs().sum() > 0


def test_scale_weight_takes_the_kernel_where_it_applies(monkeypatch):
    """``ForwardMultipliers.scale_weight`` with per-channel scales: the kernel where
    ``_row_scale_in_triton`` says so (CUDA weights; forced here), the same bits either way."""
    calls = []
    real = forward_multipliers._row_scale_in_triton

    fm = forward_multipliers.ForwardMultipliers.__new__(forward_multipliers.ForwardMultipliers)
    fm.identity, fm.combined, fm._cast, fm.graphed = False, 1.0, {}, True
    fm.combined_vector = torch.rand(6, generator=torch.Generator().manual_seed(3)) + 0.5
    weight = _inputs(6, 40, torch.bfloat16)[0]
    plain = fm.scale_weight(weight)
    monkeypatch.setattr(
        forward_multipliers,
        "_row_scale_in_triton",
        lambda w, graphed: calls.append(graphed) or True,
    )
    fused = fm.scale_weight(weight)
    assert calls == [True] and _same_bits(fused, plain)
    assert real(torch.zeros(2, 2), graphed=True) is False  # CPU weights keep PyTorch's multiply
    if torch.cuda.is_available():  # eager steps too (host launch cost)
        assert real(torch.zeros(2, 2, device="cuda"), graphed=False) is False
        assert real(torch.zeros(2, 2, device="cuda"), graphed=True) is True


def test_multipliers_know_whether_the_step_is_graphed():
    from tests.unit_tests.ssm.falcon_h1_test_utils import MULTIPLIERS, tiny_hybrid_config

    for impl, graphed in (("none", False), ("full_iteration", True)):
        config = tiny_hybrid_config(**MULTIPLIERS)
        config.cuda_graph_impl = impl
        fm = forward_multipliers.ForwardMultipliers(config, "linear_proj", config.hidden_size, 1)
        assert fm.graphed is graphed


_COMPILE_KERNEL = """
from megatron.core.fusions.fused_row_scale_triton import (
    _scale_rows_accumulate_kernel,
    _scale_rows_kernel,
)

for dtype in ("bf16", "fp16", "fp32"):
    signature = {"src_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}", "dst_ptr": f"*{dtype}",
                 "cols": "i32", "BLOCK": "constexpr"}
    compile_for_hopper(_scale_rows_kernel, signature, {"BLOCK": 1024})
    signature = {"grad_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}", "main_ptr": "*fp32",
                 "cols": "i32", "BLOCK": "constexpr"}
    for fusion in (True, False):
        ptx = compile_for_hopper(
            _scale_rows_accumulate_kernel, signature, {"BLOCK": 1024}, enable_fp_fusion=fusion
        ).asm["ptx"]
        if dtype == "fp32":
            # With fusion (Triton's default) the float32 product and the add become one FMA (one
            # rounding: not the bits of scaling, then adding), as the launch turns it off.
            assert ("fma.rn.f32" in ptx) == fusion, (fusion, "fma.rn.f32" in ptx)
"""


def test_kernel_compiles_for_hopper():
    """The kernels compile to sm_90 machine code for every dtype (no GPU needed); for float32
    gradients the accumulating kernel, launched without floating-point fusion, multiplies and
    adds in two instructions (with Triton's default fusion they would be one FMA)."""
    assert_compiles_for_hopper(_COMPILE_KERNEL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_falcon_h1_in_proj_shape():
    """Compiled kernel at the 0.5B ``mamba_in_proj`` weight (3352 x 1024), bf16: same bits."""
    weight, scale = _inputs(3352, 1024, torch.bfloat16)
    assert _same_bits(scale_rows(weight, scale), weight * scale.unsqueeze(1))
