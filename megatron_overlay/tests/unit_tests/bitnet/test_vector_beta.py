# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Per-output-row weight scales (beta as a vector ``[N]``).

Megatron fuses matrices that BitNet quantises separately (``linear_qkv`` = q, k, v per query
group; gated ``linear_fc1`` = gate, up), so beta may be one value per output row.  Checked
here: the torch reference against a float64 / numpy emulation of the formula, the Triton
kernels (compiled on CUDA, else the CPU interpreter) bit-identical to the torch reference,
and ``bitnet_linear`` forward / STE gradients with a vector beta.
"""

import numpy as np
import pytest
import torch

from megatron.core.bitnet import functional as F
from megatron.core.bitnet import quant

U32 = 2.0**-24


def _f32_div(a, b):
    """Correctly rounded fp32 division emulated in float64 (see test_quant_reference)."""
    return (np.asarray(a, np.float64) / np.asarray(b, np.float64)).astype(np.float32)


def _qkv_segment_ids(groups, heads_per_group, head_dim):
    """Row -> segment (0 q, 1 k, 2 v) of a Megatron fused QKV weight (per query group)."""
    per_group = [0] * (heads_per_group * head_dim) + [1] * head_dim + [2] * head_dim
    return torch.tensor(per_group * groups, dtype=torch.long)


def _ref_segment_beta(w, seg_ids):
    """numpy float64: beta_s = max(fp32(mean|W_s|), 1e-5) per segment, expanded to rows."""
    w32 = w.float().numpy()
    ids = seg_ids.numpy()
    beta_rows = np.empty(w32.shape[0], dtype=np.float32)
    for s in np.unique(ids):
        seg = w32[ids == s].astype(np.float64)
        mean = np.float32(np.abs(seg).sum() / seg.size)
        beta_rows[ids == s] = max(mean, np.float32(1e-5))
    return beta_rows


def _ref_quant_rows(w, beta_rows):
    w32 = w.float().numpy()
    v = _f32_div(w32, beta_rows[:, None]).astype(np.float64)
    return np.clip(np.rint(v), -1, 1).astype(np.int8)


def _segment_beta_torch(w, seg_ids, backend="torch"):
    """The separable ops as a TP layer composes them (single rank)."""
    nseg = int(seg_ids.max()) + 1
    sums = F.segment_sums(F.weight_row_abs_sums(w, backend), seg_ids, nseg)
    counts = [int((seg_ids == s).sum()) * w.shape[1] for s in range(nseg)]
    return F.expand_segment_scales(F.weight_scale_from_abs_sum(sums, counts), seg_ids)


# --------------------------------------------------------------------------------------------
# torch reference vs float64 formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_scales_match_float64_formula(dtype):
    g = torch.Generator().manual_seed(21)
    seg = _qkv_segment_ids(groups=3, heads_per_group=2, head_dim=8)
    w = torch.randn(seg.numel(), 40, generator=g)
    # give q, k and v clearly different magnitudes so a shared beta would be detected
    w = (w * torch.tensor([0.02, 0.1, 0.5])[seg][:, None]).to(dtype)
    beta = _segment_beta_torch(w, seg)
    beta_ref = _ref_segment_beta(w, seg)
    assert beta.dtype == torch.float32 and beta.shape == (seg.numel(),)
    np.testing.assert_array_equal(beta.numpy(), beta_ref)
    assert len(set(beta_ref.tolist())) == 3
    t, beta_out = quant.quantize_weight(w, beta)
    assert torch.equal(beta_out, beta)
    np.testing.assert_array_equal(t.numpy(), _ref_quant_rows(w, beta_ref))
    # rows of each segment use their own matrix's scale: equals quantising segments alone
    for s in range(3):
        t_s, b_s = quant.quantize_weight(w[seg == s])
        assert torch.equal(t[seg == s], t_s)
        assert torch.all(beta[seg == s] == b_s)


def test_arbitrary_row_vector_beta():
    """No piecewise-constant assumption: every row its own scale."""
    g = torch.Generator().manual_seed(22)
    w = torch.randn(17, 30, generator=g) * 0.05
    beta = torch.rand(17, generator=g) * 0.08 + 1e-3
    t, b = quant.quantize_weight(w, beta)
    assert b.shape == (17,)
    np.testing.assert_array_equal(t.numpy(), _ref_quant_rows(w, beta.numpy()))
    wq = quant.dequantize_weight(t, beta, torch.float32)
    assert torch.equal(wq, t.float() * beta[:, None])
    assert torch.equal(
        quant.dequantize_weight(t, beta, torch.bfloat16), (t.float() * beta[:, None]).bfloat16()
    )


def test_scalar_forms_unchanged():
    g = torch.Generator().manual_seed(23)
    w = torch.randn(6, 10, generator=g)
    t0, b0 = quant.quantize_weight(w)
    for beta in (b0, b0.reshape(1), b0.reshape(1, 1)):
        t, b = quant.quantize_weight(w, beta)
        assert b.dim() == 0 and torch.equal(t, t0)
    # a single-row weight with a 1-element beta is the scalar case
    t, b = quant.quantize_weight(w[:1], b0.reshape(1))
    assert b.dim() == 0


def test_bad_beta_shape_rejected():
    w = torch.randn(6, 10)
    with pytest.raises(ValueError, match="one per output row"):
        quant.quantize_weight(w, torch.ones(5))
    with pytest.raises(ValueError, match="one per output row"):
        F.quantize_weight(w, torch.ones(10), backend="torch")
    with pytest.raises(ValueError):
        quant.weight_scale_from_abs_sum(torch.ones(2, dtype=torch.float64), [4, 0])
    with pytest.raises(ValueError):
        quant.weight_scale_from_abs_sum(torch.ones(2, dtype=torch.float64), [4])


def test_scaled_int_matmul_vector_beta():
    g = torch.Generator().manual_seed(24)
    x = torch.randn(19, 64, generator=g) * 2
    w = torch.randn(24, 64, generator=g) * 0.05
    beta = torch.rand(24, generator=g) * 0.1 + 1e-3
    q, gamma = quant.quantize_activation(x)
    t, beta = quant.quantize_weight(w, beta)
    y = quant.scaled_int_matmul(q, gamma, t, beta)
    acc = q.to(torch.int64) @ t.to(torch.int64).t()
    # same fp32 operation order, explicit: bit-identical
    assert torch.equal(y, (acc.float() * (gamma / 127.0)[:, None]) * beta[None, :])
    y64 = acc.double() * (gamma.double() / 127.0)[:, None] * beta.double()[None, :]
    assert torch.all((y.double() - y64).abs() <= 3.5 * U32 * y64.abs() + 1e-30)
    # dgrad with W_q = beta[n] * T[n, :]
    dy = torch.randn(19, 24, generator=g)
    dx = quant.bitnet_dgrad(dy, t, beta)
    ref = dy.double() @ (t.double() * beta.double()[:, None])
    assert torch.allclose(dx.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# bitnet_linear (torch backend) with a vector beta
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
def test_bitnet_linear_vector_beta_forward_and_ste(use_cache):
    g = torch.Generator().manual_seed(25)
    seg = torch.tensor([0] * 16 + [1] * 16)  # gate / up halves
    x = (torch.randn(3, 5, 48, generator=g) * 2).requires_grad_(True)
    w = torch.nn.Parameter(
        torch.randn(32, 48, generator=g) * torch.where(seg == 0, 0.02, 0.2)[:, None]
    )
    dy = torch.randn(3, 5, 32, generator=g)
    calls = []

    def beta_fn(weight):
        calls.append(1)
        return _segment_beta_torch(weight, seg)

    cache = F.BitNetWeightCache() if use_cache else None
    for _ in range(2):
        y = F.bitnet_linear(x, w, weight_cache=cache, weight_scale_fn=beta_fn, backend="torch")
    assert len(calls) == (1 if use_cache else 2)
    y.backward(dy)
    beta = torch.from_numpy(_ref_segment_beta(w.detach(), seg))
    t = torch.from_numpy(_ref_quant_rows(w.detach(), beta.numpy()))
    q, gamma = quant.quantize_activation(x.detach().reshape(-1, 48))
    acc = q.to(torch.int64) @ t.to(torch.int64).t()
    y_ref = (acc.float() * (gamma / 127.0)[:, None]) * beta[None, :]
    assert torch.equal(y.detach().reshape(-1, 32), y_ref)
    wq64 = t.double() * beta.double()[:, None]
    xq64 = q.double() * (gamma.double() / 127.0)[:, None]
    gx_ref = dy.reshape(-1, 32).double() @ wq64
    gw_ref = dy.reshape(-1, 32).double().t() @ xq64
    assert torch.allclose(x.grad.reshape(-1, 48).double(), gx_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(w.grad.double(), gw_ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or the CPU interpreter) vs the torch reference
# --------------------------------------------------------------------------------------------


def _tk_or_skip():
    if not F.triton_available():
        pytest.skip("triton is not importable")
    from megatron.core.bitnet import triton_kernels as tk

    if tk.interpret_mode():
        dev = "cpu"
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        pytest.skip("no CUDA device and triton was imported without TRITON_INTERPRET=1")
    return tk, dev


@pytest.fixture
def tk_dev(monkeypatch):
    monkeypatch.setenv("BITNET_TRITON_AUTOTUNE", "0")
    return _tk_or_skip()


def _float_dtypes(dev):
    # the CPU interpreter mis-handles bf16 stores / dots (see test_triton_kernels.py)
    return [torch.float32] if dev == "cpu" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 40), (7, 3), (20, 1500)])
def test_triton_row_abs_sums_and_vector_weight_quant(tk_dev, shape, dtype):
    tk, dev = tk_dev
    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(*shape, generator=g) * 0.03).to(dtype).to(dev)
    rows = tk.weight_row_abs_sums(w)
    rows_ref = quant.weight_row_abs_sums(w)
    assert rows.dtype == torch.float64 and rows.shape == (shape[0],)
    assert torch.allclose(rows, rows_ref, rtol=1e-13, atol=0.0)
    seg = (torch.arange(shape[0]) * 3 // shape[0]).to(dev)  # three contiguous segments
    counts = [int((seg == s).sum()) * shape[1] for s in range(3)]
    b_tri = quant.expand_segment_scales(
        quant.weight_scale_from_abs_sum(quant.segment_sums(rows, seg, 3), counts), seg
    )
    b_ref = quant.expand_segment_scales(
        quant.weight_scale_from_abs_sum(quant.segment_sums(rows_ref, seg, 3), counts), seg
    )
    assert torch.equal(b_tri, b_ref)
    # non-piecewise-constant beta too
    for beta in (b_ref, (torch.rand(shape[0], generator=g) * 0.05 + 1e-3).to(dev)):
        t_ref, _ = quant.quantize_weight(w, beta)
        t, dense = tk.weight_quant(w, beta)
        assert dense is None and torch.equal(t, t_ref)
        for dense_dtype in _float_dtypes(dev):
            t, dense = tk.weight_quant(w, beta, dense_dtype=dense_dtype)
            assert torch.equal(t, t_ref)
            assert torch.equal(dense, quant.dequantize_weight(t_ref, beta, dense_dtype))


@pytest.mark.parametrize("mnk", [(37, 48, 100), (5, 70, 33)])
def test_triton_forward_gemm_vector_beta_bit_identical(tk_dev, mnk):
    tk, dev = tk_dev
    m, n, k = mnk
    g = torch.Generator().manual_seed(m + n)
    x = (torch.randn(m, k, generator=g) * 3).to(dev)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dev)
    beta = (torch.rand(n, generator=g) * 0.1 + 1e-3).to(dev)
    q, gamma = quant.quantize_activation(x)
    t, beta = quant.quantize_weight(w, beta)
    q[0, :] = -128
    t[0, :] = -1
    for out_dtype in _float_dtypes(dev):
        y = tk.bitnet_fwd(q, quant.activation_dequant_scale(gamma), t, beta, out_dtype)
        assert torch.equal(y, quant.scaled_int_matmul(q, gamma, t, beta, out_dtype))
    # the scalar path is unchanged by the vector support
    b0 = quant.weight_scale(w)
    y0 = tk.bitnet_fwd(q, quant.activation_dequant_scale(gamma), t, b0, torch.float32)
    assert torch.equal(y0, quant.scaled_int_matmul(q, gamma, t, b0, torch.float32))


@pytest.mark.parametrize("mnk", [(37, 48, 100), (40, 64, 96), (130, 70, 257)])
def test_triton_dgrad_vector_beta(tk_dev, mnk):
    tk, dev = tk_dev
    m, n, k = mnk
    g = torch.Generator().manual_seed(k)
    for dtype in _float_dtypes(dev):
        dy = torch.randn(m, n, generator=g).to(dtype).to(dev)
        beta = (torch.rand(n, generator=g) * 0.1 + 1e-3).to(dev)
        t, beta = quant.quantize_weight((torch.randn(n, k, generator=g) * 0.05).to(dev), beta)
        dx = tk.bitnet_dgrad(dy, t, beta)
        # the operand is dtype(beta[n] * T): the same W_q as the torch / dense path
        wq = quant.dequantize_weight(t, beta, dtype)
        ref = dy.double() @ wq.double()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert dx.dtype == dtype
        assert torch.allclose(dx.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize(
    "dimpl,wimpl", [("cublas", "cublas"), ("cublas_cached", "cublas"), ("triton", "triton")]
)
def test_bitnet_linear_vector_beta_triton_vs_torch(tk_dev, dimpl, wimpl):
    tk, dev = tk_dev
    g = torch.Generator().manual_seed(26)
    seg = _qkv_segment_ids(groups=2, heads_per_group=2, head_dim=8).to(dev)
    x0 = (torch.randn(4, 3, 64, generator=g) * 2).to(dev)
    w0 = (torch.randn(seg.numel(), 64, generator=g) * 0.05).to(dev)
    dy = torch.randn(4, 3, seg.numel(), generator=g).to(dev)
    outs = {}
    for be in ("torch", "triton"):
        x = x0.clone().requires_grad_(True)
        w = torch.nn.Parameter(w0.clone())
        beta = _segment_beta_torch(w, seg, backend=be)
        y = F.bitnet_linear(x, w, weight_scale=beta, backend=be, dgrad=dimpl, wgrad=wimpl)
        y.backward(dy)
        outs[be] = (beta, y.detach(), x.grad, w.grad)
    assert torch.equal(outs["triton"][0], outs["torch"][0])
    assert torch.equal(outs["triton"][1], outs["torch"][1])
    for a, b in zip(outs["triton"][2:], outs["torch"][2:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
