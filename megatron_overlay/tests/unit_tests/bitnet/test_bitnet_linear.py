# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""bitnet_linear on the torch backend: forward exactness, STE gradients, Megatron-style
gradient-accumulation fusion, 3D inputs, tensor-parallel separability, no host sync."""

import pytest
import torch

from megatron.core.bitnet import functional as F
from megatron.core.bitnet import quant

BE = "torch"


def _data(m_shape=(12,), k=64, n=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*m_shape, k, generator=g) * 2.0).to(dtype).requires_grad_(True)
    w = torch.nn.Parameter((torch.randn(n, k, generator=g) * 0.05).to(dtype))
    dy = torch.randn(*m_shape, n, generator=g).to(dtype)
    return x, w, dy


def _reference_ste(x, w, dy, bias=None):
    """Autograd of the explicit formula with the detach trick, in float64.

    x_ste = x + (x_q - x).detach(), w_ste = w + (w_q - w).detach(), y = x_ste @ w_ste^T.
    """
    q, gamma = quant.quantize_activation(x.detach())
    t, beta = quant.quantize_weight(w.detach())
    xq = q.double() * (gamma.double() / 127.0).unsqueeze(-1)
    wq = t.double() * beta.double()
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    x_ste = x64 + (xq - x64).detach()
    w_ste = w64 + (wq - w64).detach()
    y = x_ste @ w_ste.t()
    b64 = None
    if bias is not None:
        b64 = bias.detach().double().requires_grad_(True)
        y = y + b64
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def _close(a, b, rtol=2e-6, atol=1e-6):
    a = a.double()
    b = b.double()
    scale = b.abs().max().clamp_min(1e-12)
    return bool(((a - b).abs() <= rtol * b.abs() + atol * scale).all())


@pytest.mark.parametrize("m_shape", [(12,), (5, 3)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_forward_and_ste_gradients_match_reference(m_shape, use_bias):
    x, w, dy = _data(m_shape=m_shape, seed=len(m_shape) + 10 * use_bias)
    bias = torch.nn.Parameter(torch.randn(w.shape[0]) * 0.1) if use_bias else None
    y = F.bitnet_linear(x, w, bias, backend=BE)
    assert y.shape == (*m_shape, w.shape[0]) and y.dtype == x.dtype
    y.backward(dy)
    y_ref, gx_ref, gw_ref, gb_ref = _reference_ste(x, w, dy, bias)
    assert _close(y.detach(), y_ref)
    assert _close(x.grad, gx_ref)
    assert _close(w.grad, gw_ref)
    if use_bias:
        assert _close(bias.grad, gb_ref)
    # STE: the gradient is not the gradient of the full-precision linear
    gx_fp = dy.reshape(-1, dy.shape[-1]) @ w.detach()
    assert not _close(x.grad.reshape(gx_fp.shape), gx_fp, rtol=1e-3, atol=1e-3)


def test_forward_is_exact_scaled_integer_product():
    x, w, _ = _data(m_shape=(4, 2), k=96, n=40, seed=3)
    y = F.bitnet_linear(x, w, backend=BE)
    q, gamma = quant.quantize_activation(x.detach().reshape(-1, 96))
    t, beta = quant.quantize_weight(w.detach())
    acc = q.to(torch.int64) @ t.to(torch.int64).t()
    y_ref = (acc.float() * (gamma / 127.0)[:, None]) * beta
    assert torch.equal(y.detach().reshape(-1, 40), y_ref)


def test_bf16_inputs_3d():
    x, w, dy = _data(m_shape=(6, 2), k=128, n=32, seed=4, dtype=torch.bfloat16)
    y = F.bitnet_linear(x, w, backend=BE)
    assert y.dtype == torch.bfloat16 and y.shape == (6, 2, 32)
    y.backward(dy)
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    assert w.grad.dtype == torch.bfloat16 and w.grad.shape == w.shape
    _, gx_ref, gw_ref, _ = _reference_ste(x, w, dy)
    # bf16 operands (W_q = bf16(beta*T), x_q = bf16(Q*s)) -> bf16-level agreement
    assert _close(x.grad, gx_ref, rtol=2e-2, atol=1e-2)
    assert _close(w.grad, gw_ref, rtol=2e-2, atol=1e-2)


def test_saves_int8_not_input():
    x, w, _ = _data(seed=5)
    y = F.bitnet_linear(x, w, backend=BE)
    saved = y.grad_fn.saved_tensors
    dtypes = [t.dtype for t in saved if t is not None]
    assert torch.int8 in dtypes
    assert not any(t is not None and t.shape == x.shape and t.is_floating_point() for t in saved)


def _megatron_like_weight(w, grad_added=False, zero_out=False):
    w.main_grad = torch.randn(w.shape, dtype=torch.float32) * 0.01
    if grad_added:
        w.grad_added_to_main_grad = False
    if zero_out:
        w.zero_out_wgrad = True
    return w


@pytest.mark.parametrize("flags", ["plain", "grad_added", "zero_out"])
def test_gradient_accumulation_fusion_into_main_grad(flags):
    x, w, dy = _data(m_shape=(3, 4), seed=6)
    _megatron_like_weight(w, grad_added=flags != "plain", zero_out=flags == "zero_out")
    mg0 = w.main_grad.clone()
    # two micro-batches accumulate
    x2, _, dy2 = _data(m_shape=(3, 4), seed=7)
    for xx, gg in ((x, dy), (x2, dy2)):
        F.bitnet_linear(xx, w, gradient_accumulation_fusion=True, backend=BE).backward(gg)
    _, _, gw1, _ = _reference_ste(x, w, dy)
    _, _, gw2, _ = _reference_ste(x2, w, dy2)
    assert _close(w.main_grad - mg0, gw1 + gw2, rtol=1e-5, atol=1e-6)
    if flags == "plain":
        assert w.grad is None
    else:
        assert w.grad_added_to_main_grad is True
        assert w.grad is not None and w.grad.shape == w.shape  # dummy, as in Megatron
        if flags == "zero_out":
            assert int(torch.count_nonzero(w.grad)) == 0


def test_fusion_flag_off_or_no_main_grad_gives_normal_grad():
    x, w, dy = _data(seed=8)
    w.main_grad = torch.zeros(w.shape)
    F.bitnet_linear(x, w, gradient_accumulation_fusion=False, backend=BE).backward(dy)
    assert w.grad is not None and int(torch.count_nonzero(w.main_grad)) == 0
    x, w2, dy = _data(seed=8)  # no main_grad attribute: fusion request is ignored
    F.bitnet_linear(x, w2, gradient_accumulation_fusion=True, backend=BE).backward(dy)
    assert torch.equal(w2.grad, w.grad)


def test_bf16_main_grad_accumulates():
    x, w, dy = _data(seed=9)
    w.main_grad = torch.zeros(w.shape, dtype=torch.bfloat16)
    F.bitnet_linear(x, w, gradient_accumulation_fusion=True, backend=BE).backward(dy)
    _, _, gw, _ = _reference_ste(x, w, dy)
    assert _close(w.main_grad, gw, rtol=1e-2, atol=1e-2)


def test_input_without_grad_and_frozen_weight():
    x, w, dy = _data(seed=10)
    x = x.detach()
    y = F.bitnet_linear(x, w, backend=BE)
    y.backward(dy)
    assert w.grad is not None
    x, w, dy = _data(seed=11)
    w.requires_grad_(False)
    F.bitnet_linear(x, w, backend=BE).backward(dy)
    assert x.grad is not None and w.grad is None


def test_external_scales_emulating_tensor_parallel():
    """Scales reduced over shards (SUM for |W|, MAX for per-token |x|) reproduce the
    unsharded quantisation exactly, so numerics do not depend on the TP size."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(10, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.03
    q_full, gamma_full = quant.quantize_activation(x)
    t_full, beta_full = quant.quantize_weight(w)
    for tp in (2, 4):
        # row-parallel: hidden (K) sharded -> per-token MAX
        gam = torch.stack([F.activation_absmax(xs, BE) for xs in x.chunk(tp, dim=-1)]).amax(0)
        assert torch.equal(gam, gamma_full)
        qs = [F.quantize_activation(xs, gam, BE).q for xs in x.chunk(tp, dim=-1)]
        assert torch.equal(torch.cat(qs, dim=-1), q_full)
        # column-parallel: output rows sharded -> global mean via SUM of fp64 partial sums
        total = sum(F.weight_abs_sum(ws, BE) for ws in w.chunk(tp, dim=0))
        beta = F.weight_scale_from_abs_sum(total, w.numel())
        assert torch.equal(beta, beta_full)
        ts = [F.quantize_weight(ws, beta, backend=BE).t for ws in w.chunk(tp, dim=0)]
        assert torch.equal(torch.cat(ts, dim=0), t_full)
    # bitnet_linear with the external scales equals the unsharded call
    xr = x.clone().requires_grad_(True)
    y_ext = F.bitnet_linear(xr, w, gamma=gamma_full, weight_scale=beta_full, backend=BE)
    y_int = F.bitnet_linear(x, w, backend=BE)
    assert torch.equal(y_ext, y_int)
    # a beta_fn is evaluated (exactly once) to produce the scale
    calls = []

    def beta_fn(weight):
        calls.append(1)
        return beta_full

    cache = F.BitNetWeightCache()
    for _ in range(3):
        F.bitnet_linear(x, w, weight_cache=cache, weight_scale_fn=beta_fn, backend=BE)
    assert len(calls) == 1


def test_no_host_sync_in_forward_backward(monkeypatch):
    """Our code must not call .item()/.tolist()/bool() on tensors (host syncs on GPU)."""
    x, w, dy = _data(m_shape=(4, 3), seed=13)
    w.main_grad = torch.zeros(w.shape)
    cache = F.BitNetWeightCache()

    def boom(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    for fusion in (False, True):
        y = F.bitnet_linear(
            x, w, weight_cache=cache, gradient_accumulation_fusion=fusion, backend=BE
        )
        y.backward(dy)


def test_rejects_mismatched_shapes():
    x, w, _ = _data(k=64)
    with pytest.raises(ValueError):
        F.bitnet_linear(x[..., :32], w, backend=BE)
    with pytest.raises(ValueError):
        F.bitnet_linear(x, w, gamma=torch.ones(3), backend=BE)


def test_prequantized_weight_argument():
    x, w, dy = _data(seed=14)
    wq = F.quantize_weight(w, backend=BE)
    y1 = F.bitnet_linear(x, w, weight_quant=wq, backend=BE)
    y2 = F.bitnet_linear(x, w, backend=BE)
    assert torch.equal(y1, y2)
