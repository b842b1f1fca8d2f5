# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""RoPE fusion (``apply_rope_fusion``, on unless ``--no-rope-fusion``) without Transformer
Engine: the Triton RoPE kernel (megatron/core/fusions/fused_rope_triton.py) against upstream's
unfused bshd RoPE evaluated in float64. The kernel computes in float32 and rounds once, so
float32 inputs agree to float32 rounding and low-precision inputs are the float64 result rounded
(within one ulp). On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, as
``make test`` sets).
"""

import pytest
import torch

from megatron.core.fusions import triton_support
from megatron.core.fusions.fused_rope_triton import triton_apply_rotary_pos_emb, triton_rope_applies
from megatron.core.models.common.embeddings import rope_utils
from tests.unit_tests.fusions.triton_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_support.INTERPRET,
    reason="no GPU: run with TRITON_INTERPRET=1 (Triton's CPU interpreter), as `make test` does",
)


def _freqs(seq, rot_dim, seed=1):
    """Angles [seq, 1, 1, rot_dim] (float32). Megatron's rotary embedding repeats the same
    angles in both halves; these differ, so that mixing up the halves cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(seq, 1, 1, rot_dim, generator=gen) * 50.0).to(DEVICE)


def _reference(t, freqs, grad_output):
    """Upstream's unfused bshd RoPE in float64, and the gradient of <out, grad_output>."""
    x = t.detach().double().requires_grad_()
    out = rope_utils._apply_rotary_pos_emb_bshd(x, freqs.double())
    (grad,) = torch.autograd.grad(out, x, grad_output.double())
    return out.detach(), grad


def _run(t, freqs, grad_output):
    x = t.detach().clone().requires_grad_()
    out = triton_apply_rotary_pos_emb(x, freqs)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    return out, grad


# (seq, batch, heads, head dim, rotary channels): all channels rotary, a pass-through part,
# a single head and a head count that is not a power of two
SHAPES = [(5, 3, 4, 16, 16), (6, 2, 3, 24, 16), (4, 1, 1, 8, 8), (3, 2, 6, 32, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_the_unfused_rope(shape):
    seq, batch, heads, dim, rot_dim = shape
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(seq, batch, heads, dim, generator=gen).to(DEVICE)
    grad_output = torch.randn(seq, batch, heads, dim, generator=gen).to(DEVICE)
    freqs = _freqs(seq, rot_dim)
    out, grad = _run(t, freqs, grad_output)
    ref_out, ref_grad = _reference(t, freqs, grad_output)
    assert out.dtype == torch.float32 and out.is_contiguous() and grad.shape == t.shape
    # float32 products of O(1) values and float32 cos / sin of angles up to 50
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)
    if rot_dim < dim:  # the pass-through channels are copied exactly, and so is their gradient
        assert torch.equal(out[..., rot_dim:], t[..., rot_dim:])
        assert torch.equal(grad[..., rot_dim:], grad_output[..., rot_dim:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_the_float64_result_rounded(dtype):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(8, 2, 4, 32, generator=gen).to(DEVICE, dtype)
    grad_output = torch.randn(8, 2, 4, 32, generator=gen).to(DEVICE, dtype)
    freqs = _freqs(8, 32)
    out, grad = _run(t, freqs, grad_output)
    ref_out, ref_grad = _reference(t, freqs, grad_output)
    assert out.dtype == dtype and grad.dtype == dtype
    for got, want in ((out, ref_out), (grad, ref_grad)):
        ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got.double() - want).abs() <= ulp).all()


def test_strided_heads_of_a_fused_projection():
    """q as Megatron splits it from a fused QKV output: a strided view, rotated correctly."""
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(5, 2, 2, 3 * 16, generator=gen).to(DEVICE)  # [s, b, groups, (q k v)]
    query = mixed[..., :16]
    assert not query.is_contiguous()
    grad_output = torch.randn(5, 2, 2, 16, generator=gen).to(DEVICE)
    freqs = _freqs(5, 16)
    out, grad = _run(query, freqs, grad_output)
    ref_out, ref_grad = _reference(query, freqs, grad_output)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)


def test_what_the_kernel_does_not_serve_is_left_to_the_other_paths():
    t = torch.zeros(4, 2, 3, 16, device=DEVICE)
    assert triton_rope_applies(t, _freqs(4, 16), rotary_interleaved=False)
    assert not triton_rope_applies(t, _freqs(4, 16), rotary_interleaved=True)
    assert not triton_rope_applies(t, _freqs(4, 16).expand(4, 2, 1, 16), False)  # per sample
    assert not triton_rope_applies(t, _freqs(4, 18)[..., :18], False)  # more than dim
    assert not triton_rope_applies(t, _freqs(3, 16), False)  # other sequence length
    with pytest.raises(ValueError, match="triton_apply_rotary_pos_emb: needs"):
        triton_apply_rotary_pos_emb(t, _freqs(3, 16))


def test_rope_fusion_without_transformer_engine_takes_the_triton_kernel(monkeypatch):
    """apply_rotary_pos_emb with apply_rope_fusion and no TE fused RoPE: the Triton function's
    node, not the unfused ops; without fusion the unfused path as before."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)
    t = torch.randn(4, 2, 2, 8, device=DEVICE, requires_grad=True)
    freqs = _freqs(4, 8)
    config.apply_rope_fusion = True
    fused = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=_NoGroup())
    config.apply_rope_fusion = False
    unfused = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=_NoGroup())
    assert type(fused.grad_fn).__name__ == "_TritonRotaryPosEmbBackward"
    assert type(unfused.grad_fn).__name__ != "_TritonRotaryPosEmbBackward"
    torch.testing.assert_close(fused, unfused, rtol=0, atol=2e-6)


def test_config_takes_rope_fusion_without_transformer_engine(monkeypatch):
    """TransformerConfig refused apply_rope_fusion (upstream's default) without TE's fused
    RoPE ("Please install TE >= 1.4"), so a no-TE launch without --no-rope-fusion stopped before
    reaching the Triton kernel (seen on an H200); it takes it now. Without TE nor Triton it still
    refuses, naming --no-rope-fusion."""
    import builtins

    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None)
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, apply_rope_fusion=True
    )
    assert config.apply_rope_fusion

    real_import = builtins.__import__

    def no_triton_rope(name, *args, **kwargs):
        if name == "megatron.core.fusions.fused_rope_triton":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton_rope)
    with pytest.raises(ValueError, match="--no-rope-fusion"):
        TransformerConfig(
            num_layers=1, hidden_size=16, num_attention_heads=2, apply_rope_fusion=True
        )


class _NoGroup:
    """Stands in for the context-parallel group (unused by the bshd paths)."""

    def size(self):
        return 1

    def rank(self):
        return 0


_COMPILE_KERNEL = """
from megatron.core.fusions.fused_rope_triton import _rope_kernel

scalars = {"batch": "i32", "heads": "i32", "stride_xs": "i32", "stride_xb": "i32",
           "stride_xh": "i32", "stride_fs": "i32", "dim": "i32"}
blocks = {"HALF": "constexpr", "BLOCK_H": "constexpr", "BLOCK_HALF": "constexpr",
          "BLOCK_PASS": "constexpr", "BACKWARD": "constexpr"}
for dtype in ("bf16", "fp16", "fp32"):
    signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "freqs_ptr": "*fp32",
                 **scalars, **blocks}
    for backward in (False, True):
        for block_pass in (0, 16):
            constexprs = {"HALF": 32, "BLOCK_H": 8, "BLOCK_HALF": 32, "BLOCK_PASS": block_pass,
                          "BACKWARD": backward}
            compile_for_hopper(_rope_kernel, signature, constexprs)
"""


def test_kernel_compiles_for_hopper():
    """The kernel compiles to sm_90 machine code for every dtype and variant (no GPU needed)."""
    assert_compiles_for_hopper(_COMPILE_KERNEL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_falcon_h1_query_shape():
    """Compiled kernel at the Falcon-H1-0.5B query shape (s 2048, b 4, 8 heads of 64), bf16."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2048, 4, 8, 64, generator=gen).cuda().bfloat16()
    grad_output = torch.randn(2048, 4, 8, 64, generator=gen).cuda().bfloat16()
    freqs = _freqs(2048, 64)
    out, grad = _run(t, freqs, grad_output)
    ref_out, ref_grad = _reference(t, freqs, grad_output)
    for got, want, x in ((out, ref_out, t), (grad, ref_grad, grad_output)):
        # One bf16 rounding of the result, plus the float32 error of x1 * cos -/+ x2 * sin
        # (libdevice's cos / sin within 2 ulps, two products and a sum): a few float32 ulps of
        # the inputs, which outweigh a bf16 ulp of the result where the two products cancel
        # (an exact float32 emulation on the CPU errs by 3e-8 at |out| ~ 1e-6 in these tensors)
        ulp = torch.finfo(torch.bfloat16).eps * want.abs()
        cancellation = 4 * torch.finfo(torch.float32).eps * x.abs().max().double()
        assert ((got.double() - want).abs() <= ulp + cancellation).all()
