# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Exactness of the pure-torch BitNet reference (megatron.core.bitnet.quant)."""

import numpy as np
import pytest
import torch

from megatron.core.bitnet import quant

U32 = 2.0**-24  # unit roundoff of fp32


def _rne(v: np.ndarray) -> np.ndarray:
    """Round half to even in float64 (numpy's rint is IEEE round-half-even)."""
    return np.rint(v)


def _f32_div(a: np.ndarray, b) -> np.ndarray:
    """Correctly rounded fp32 division emulated in float64.

    Rounding the float64 quotient of two fp32 numbers to fp32 is correctly rounded because
    53 >= 2*24 + 2 (double rounding is innocuous for division at that precision).
    """
    return (np.asarray(a, np.float64) / np.asarray(b, np.float64)).astype(np.float32)


def _ref_weight(w: torch.Tensor):
    w32 = w.float().numpy()
    mean = np.abs(w32.astype(np.float64)).sum() / w32.size
    beta = np.float32(max(np.float32(mean), np.float32(1e-5)))
    t = np.clip(_rne(_f32_div(w32, beta).astype(np.float64)), -1, 1).astype(np.int8)
    return t, beta


def _ref_act(x: torch.Tensor):
    x32 = x.float().numpy().reshape(-1, x.shape[-1])
    gamma = np.maximum(np.abs(x32).max(axis=-1), np.float32(1e-5)).astype(np.float32)
    num = (x32 * np.float32(127.0)).astype(np.float32)
    v = _f32_div(num, gamma[:, None])
    q = np.clip(_rne(v.astype(np.float64)), -128, 127).astype(np.int8)
    return q, gamma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 100), (7, 3), (256, 64)])
def test_weight_quant_matches_float64_formula(dtype, shape):
    g = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    t, beta = quant.quantize_weight(w)
    t_ref, beta_ref = _ref_weight(w)
    assert t.dtype == torch.int8 and t.shape == w.shape
    assert beta.dtype == torch.float32 and beta.dim() == 0
    assert beta.item() == float(beta_ref)
    np.testing.assert_array_equal(t.numpy(), t_ref)
    assert set(np.unique(t.numpy())).issubset({-1, 0, 1})
    # all three levels actually occur for gaussian weights of this size
    if w.numel() >= 1000:
        assert set(np.unique(t.numpy())) == {-1, 0, 1}


def test_weight_scale_eps_floor():
    w = torch.zeros(4, 8)
    t, beta = quant.quantize_weight(w)
    assert beta.item() == np.float32(1e-5)
    assert int(t.abs().sum()) == 0
    tiny = torch.full((4, 8), 1e-9)
    _, beta2 = quant.quantize_weight(tiny)
    assert beta2.item() == np.float32(1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quant_matches_float64_formula(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, 130, generator=g) * 3.0
    x[0, 0] = 0.0  # all-zero token -> gamma = eps
    x[1, 2, 5] = 1e4  # outlier token
    x = x.to(dtype)
    q, gamma = quant.quantize_activation(x)
    q_ref, gamma_ref = _ref_act(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert gamma.dtype == torch.float32 and gamma.shape == x.shape[:-1]
    np.testing.assert_array_equal(gamma.reshape(-1).numpy(), gamma_ref)
    np.testing.assert_array_equal(q.reshape(-1, 130).numpy(), q_ref)
    assert gamma[0, 0].item() == np.float32(1e-5)
    assert int(q.max()) == 127 and int(q.min()) >= -128


def test_round_half_even_ties_activation():
    # Row max is 127, so v = fp32(x*127)/127 == x exactly and every x.5 is an exact tie.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5]])
    q, gamma = quant.quantize_activation(x)
    assert gamma.item() == 127.0
    expected = [127, 0, 2, 2, 0, -2, -2, 4, 126, -126]  # half-away-from-zero would differ
    assert q.tolist() == [expected]


def test_round_half_even_ties_weight():
    # |w| mean is exactly 1.0 -> beta = 1, w/beta = +-0.5 are ties that must round to 0.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [0.5, -0.5, 1.5, -1.5]])
    t, beta = quant.quantize_weight(w)
    assert beta.item() == 1.0
    assert t.tolist() == [[0, 0, 1, -1], [0, 0, 1, -1]]


def test_activation_quant_clamps_to_int8_with_external_gamma():
    x = torch.tensor([[1.0, -1.0, 0.25, -2.0]])
    # gamma smaller than max|x| (can only come from outside): values saturate at -128 / 127.
    q, _ = quant.quantize_activation(x, gamma=torch.tensor([0.5]))
    assert q.tolist() == [[127, -128, 64, -128]]


def test_int_matmul_exact_extremes():
    k = 4096
    q = torch.full((3, k), -128, dtype=torch.int8)
    q[1] = 127
    q[2, ::2] = 127
    t = torch.full((2, k), -1, dtype=torch.int8)
    t[1, ::3] = 0
    acc = quant.int_matmul_exact(q, t)
    ref = q.to(torch.int64) @ t.to(torch.int64).t()
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), ref)
    assert acc[0, 0].item() == 128 * k


def test_int_matmul_exact_random_and_fp64_branch():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (17, 300), generator=g, dtype=torch.int8)
    t = torch.randint(-1, 2, (11, 300), generator=g, dtype=torch.int8)
    ref = q.to(torch.int64) @ t.to(torch.int64).t()
    assert torch.equal(quant.int_matmul_exact(q, t).to(torch.int64), ref)
    # K above the fp32-exact bound takes the fp64 branch.  The exact result is an odd integer
    # above 2**24, which fp32 cannot represent, so an fp32 product would have to be wrong.
    k = quant.FP32_EXACT_MAX_K + 8
    q = torch.full((2, k), -128, dtype=torch.int8)
    q[0, 0] = -127
    t = torch.full((1, k), -1, dtype=torch.int8)
    expected = 128 * (k - 1) + 127
    assert expected > 2**24 and expected % 2 == 1
    acc = quant.int_matmul_exact(q, t)
    assert acc[0, 0].item() == expected
    assert acc[1, 0].item() == 128 * k


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_int_matmul_vs_float64_formula(out_dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(33, 200, generator=g)
    w = torch.randn(40, 200, generator=g) * 0.05
    q, gamma = quant.quantize_activation(x)
    t, beta = quant.quantize_weight(w)
    y = quant.scaled_int_matmul(q, gamma, t, beta, torch.float32)
    acc = q.double() @ t.double().t()
    y64 = (gamma.double()[:, None] / 127.0) * beta.double() * acc
    # fp32 evaluation: s = fl(gamma/127), fl(fl(acc*s)*beta): at most 3 roundings.
    err = (y.double() - y64).abs()
    assert torch.all(err <= 3.5 * U32 * y64.abs() + 1e-30)
    # same order of operations, explicit: must be bit-identical
    s = gamma / 127.0
    y_explicit = (acc.float() * s[:, None]) * beta
    assert torch.equal(y, y_explicit)
    y_cast = quant.scaled_int_matmul(q, gamma, t, beta, out_dtype)
    assert y_cast.dtype == out_dtype
    assert torch.equal(y_cast, y.to(out_dtype))


def test_dequantize_definitions():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 50, generator=g)
    q, gamma = quant.quantize_activation(x)
    xq = quant.dequantize_activation(q, gamma)
    assert torch.equal(xq, q.float() * (gamma / 127.0)[:, None])
    # quantisation error is at most half a step per element
    assert torch.all((xq - x).abs() <= (gamma / 127.0)[:, None] * 0.5 * (1 + 1e-6))
    w = torch.randn(5, 50, generator=g)
    t, beta = quant.quantize_weight(w)
    assert torch.equal(quant.dequantize_weight(t, beta), t.float() * beta)


def test_dequant_scale_is_ieee_quotient():
    g = torch.Generator().manual_seed(9)
    gamma = torch.rand(10000, generator=g) * 50 + 1e-5
    s = quant.activation_dequant_scale(gamma)
    ref = _f32_div(gamma.numpy(), np.float32(127.0))
    np.testing.assert_array_equal(s.numpy(), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_path_is_device_independent():
    """torch on CUDA turns `t / scalar` into `t * (1/scalar)`; the reference must not."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(257, 300, generator=g) * 3
    w = torch.randn(64, 300, generator=g) * 0.02
    gamma = torch.rand(100000, generator=g) * 50 + 1e-5
    assert torch.equal(
        quant.activation_dequant_scale(gamma.cuda()).cpu(), quant.activation_dequant_scale(gamma)
    )
    qc, gc = quant.quantize_activation(x)
    qg, gg = quant.quantize_activation(x.cuda())
    assert torch.equal(qg.cpu(), qc) and torch.equal(gg.cpu(), gc)
    tc, bc = quant.quantize_weight(w)
    tg, bg = quant.quantize_weight(w.cuda())
    assert torch.equal(tg.cpu(), tc) and torch.equal(bg.cpu(), bc)
    yc = quant.scaled_int_matmul(qc, gc, tc, bc)
    yg = quant.scaled_int_matmul(qg, gg, tg, bg)
    assert torch.equal(yg.cpu(), yc)
