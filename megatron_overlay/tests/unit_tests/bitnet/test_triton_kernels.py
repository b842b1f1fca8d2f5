# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Triton kernels vs the torch reference.

Runs on CUDA when available (compiled kernels), otherwise in Triton's CPU interpreter
(``TRITON_INTERPRET=1`` in the environment the run starts with).  Quantised
values and the forward product must be bit-identical to :mod:`megatron.core.bitnet.quant`.
"""

import pytest
import torch

from megatron.core.bitnet import functional as F
from megatron.core.bitnet import quant

if not F.triton_available():
    pytest.skip("triton is not importable", allow_module_level=True)

from megatron.core.bitnet import triton_kernels as tk  # noqa: E402

_HINT = (
    "run `TRITON_INTERPRET=1 python -m pytest tests/unit_tests/bitnet` (the variable must be set "
    "before anything imports triton)"
)
if tk.interpret_mode():
    DEV = "cpu"
    try:  # smoke test: fails if triton itself was imported before TRITON_INTERPRET was set
        tk.act_quant(torch.ones(2, 4))
    except Exception as exc:  # pragma: no cover - depends on the session's import order
        pytest.skip(
            f"Triton CPU interpreter unusable in this process ({exc!r}); {_HINT}",
            allow_module_level=True,
        )
elif torch.cuda.is_available():
    DEV = "cuda"
else:
    pytest.skip(
        f"no CUDA device and triton was imported without TRITON_INTERPRET=1; {_HINT}",
        allow_module_level=True,
    )

# bf16 *inputs* work in the CPU interpreter, but it mis-handles bf16 stores and bf16 dots
# (checked with triton 3.8), so bf16 outputs / GEMM operands are tested on the GPU only.
IN_DTYPES = [torch.float32, torch.bfloat16]
FLOAT_DTYPES = [torch.float32] if DEV == "cpu" else [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    # Tiny test shapes: a fixed config keeps GPU compile time low (no effect in interpreter).
    monkeypatch.setenv("BITNET_TRITON_AUTOTUNE", "0")


def _randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("shape", [(37, 100), (4, 3, 64), (5, 16400)])
def test_act_quant_bit_identical(shape, dtype):
    x = _randn(*shape, seed=sum(shape), scale=2.0, dtype=dtype)
    x.view(-1, shape[-1])[0].zero_()  # eps row
    q, gamma, s = tk.act_quant(x)
    q_ref, gamma_ref = quant.quantize_activation(x.reshape(-1, shape[-1]))
    assert torch.equal(gamma, gamma_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, quant.activation_dequant_scale(gamma_ref))
    # s = gamma / 127 must be the IEEE quotient on every device (CPU division is IEEE)
    assert torch.equal(s.cpu(), gamma_ref.cpu() / 127.0)
    assert torch.equal(tk.act_absmax(x), gamma_ref)


@pytest.mark.parametrize("k", [100, 16400])
def test_act_quant_external_gamma(k):
    x = _randn(9, k, seed=k, scale=2.0)
    gamma = quant.activation_absmax(x) * torch.linspace(0.25, 2.0, 9, device=DEV)
    q, g_out, s = tk.act_quant(x, gamma)
    q_ref, _ = quant.quantize_activation(x, gamma)
    assert torch.equal(g_out, gamma)
    assert torch.equal(s.cpu(), gamma.cpu() / 127.0)
    assert torch.equal(q, q_ref)
    assert int(q.max()) == 127 and int(q.min()) == -128  # rows with gamma < max|x| saturate


def test_round_half_even_ties():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5]], device=DEV)
    q, _, _ = tk.act_quant(x)
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 4, 126, -126]]
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [0.5, -0.5, 1.5, -1.5]], device=DEV)
    beta = quant.weight_scale(w)
    assert beta.item() == 1.0
    t, _ = tk.weight_quant(w, beta)
    assert t.cpu().tolist() == [[0, 0, 1, -1], [0, 0, 1, -1]]


@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("shape", [(48, 100), (3, 5), (130, 257)])
def test_weight_quant_bit_identical(shape, dtype):
    w = _randn(*shape, seed=shape[0], scale=0.02, dtype=dtype)
    s_tri = tk.weight_abs_sum(w)
    s_ref = quant.weight_abs_sum(w)
    assert s_tri.dtype == torch.float64
    assert torch.allclose(s_tri, s_ref, rtol=1e-13, atol=0.0)
    beta_tri = quant.weight_scale_from_abs_sum(s_tri, w.numel())
    t_ref, beta_ref = quant.quantize_weight(w)
    assert torch.equal(beta_tri, beta_ref)  # fp64 accumulation: order does not reach fp32
    assert torch.equal(tk.weight_quant(w, beta_ref)[0], t_ref)
    for dense_dtype in FLOAT_DTYPES:
        t, dense = tk.weight_quant(w, beta_ref, dense_dtype=dense_dtype)
        assert torch.equal(t, t_ref)
        assert torch.equal(dense, quant.dequantize_weight(t_ref, beta_ref, dense_dtype))


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mnk", [(37, 48, 100), (64, 64, 128), (5, 70, 33)])
def test_forward_gemm_bit_identical(mnk, out_dtype):
    m, n, k = mnk
    x = _randn(m, k, seed=m, scale=3.0)
    w = _randn(n, k, seed=n, scale=0.05)
    q, gamma = quant.quantize_activation(x)
    t, beta = quant.quantize_weight(w)
    q[0, :] = -128  # extremes
    t[0, :] = -1
    y = tk.bitnet_fwd(q, quant.activation_dequant_scale(gamma), t, beta, out_dtype)
    y_ref = quant.scaled_int_matmul(q, gamma, t, beta, out_dtype)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mnk", [(37, 48, 100), (64, 64, 128), (130, 70, 257)])
def test_dgrad(mnk, dtype):
    m, n, k = mnk
    dy = _randn(m, n, seed=1, dtype=dtype)
    t, beta = quant.quantize_weight(_randn(n, k, seed=2, scale=0.05))
    dx = tk.bitnet_dgrad(dy, t, beta)
    ref = (dy.double() @ t.double()) * beta.double()
    assert dx.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(dx.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mnk", [(37, 48, 100), (64, 64, 128), (130, 70, 257)])
def test_wgrad_and_main_grad_accumulation(mnk, dtype):
    m, n, k = mnk
    dy = _randn(m, n, seed=3, dtype=dtype)
    q, gamma = quant.quantize_activation(_randn(m, k, seed=4, scale=2.0))
    s = quant.activation_dequant_scale(gamma)
    xq = quant.dequantize_activation(q, gamma, dtype)  # operand as the kernel rounds it
    ref = dy.double().t() @ xq.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    dw = tk.bitnet_wgrad(dy, q, s)
    assert dw.dtype == dtype and dw.shape == (n, k)
    assert torch.allclose(dw.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    mg = _randn(n, k, seed=5)
    mg0 = mg.clone()
    assert tk.bitnet_wgrad(dy, q, s, main_grad=mg) is None
    assert tk.bitnet_wgrad(dy, q, s, main_grad=mg) is None
    got = (mg - mg0).double()
    assert torch.allclose(got, 2 * ref, rtol=tol, atol=2 * tol * ref.abs().max().item())


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("shape", [(48, 100), (3, 5), (130, 257)])
def test_weight_dequant_bit_identical(shape, per_row):
    w = _randn(*shape, seed=shape[1], scale=0.02)
    beta = quant.weight_scale(w)
    if per_row:
        beta = (torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) * 0.05 + 1e-3).to(
            DEV
        )
    t, beta = quant.quantize_weight(w, beta)
    for dtype in FLOAT_DTYPES:
        got = tk.weight_dequant(t, beta, dtype)
        assert got.dtype == dtype and got.shape == t.shape
        assert torch.equal(got, quant.dequantize_weight(t, beta, dtype))
        # the same operand the cached dense copy holds
        assert torch.equal(got, tk.weight_quant(w, beta, dense_dtype=dtype)[1])


def test_act_dequant_bit_identical():
    q, gamma = quant.quantize_activation(_randn(21, 77, seed=6, scale=2.0))
    for dtype in FLOAT_DTYPES:
        assert torch.equal(
            tk.act_dequant(q, quant.activation_dequant_scale(gamma), dtype),
            quant.dequantize_activation(q, gamma, dtype),
        )


@pytest.mark.parametrize(
    "dimpl,wimpl", [("cublas", "cublas"), ("cublas_cached", "cublas"), ("triton", "triton")]
)
@pytest.mark.parametrize("fusion", [False, True])
def test_bitnet_linear_triton_vs_torch_backend(fusion, dimpl, wimpl):
    x = _randn(6, 5, 96, seed=7, scale=2.0).requires_grad_(True)
    w = torch.nn.Parameter(_randn(40, 96, seed=8, scale=0.05))
    dy = _randn(6, 5, 40, seed=9)
    outs = {}
    for be in ("torch", "triton"):
        xx = x.detach().clone().requires_grad_(True)
        ww = torch.nn.Parameter(w.detach().clone())
        if fusion:
            ww.main_grad = torch.zeros(ww.shape, device=DEV)
        y = F.bitnet_linear(
            xx, ww, gradient_accumulation_fusion=fusion, backend=be, dgrad=dimpl, wgrad=wimpl
        )
        y.backward(dy)
        gw = ww.main_grad if fusion else ww.grad
        outs[be] = (y.detach(), xx.grad, gw)
    assert torch.equal(outs["triton"][0], outs["torch"][0])  # forward exact on both
    for a, b in zip(outs["triton"][1:], outs["torch"][1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize(
    "dimpl,wimpl", [("cublas", "cublas"), ("cublas_cached", "cublas"), ("triton", "triton")]
)
@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_output_scale_triton_vs_torch_backend_and_unfolded(per_row, fusion, dimpl, wimpl):
    """A folded output scale (forward multipliers): the Triton backend gives the torch
    backend's forward bit for bit, and both give the unfolded ``bitnet_linear(x, w) * s`` and
    its gradients within fp32 rounding (the fold multiplies ``beta * s`` once per step instead
    of every output element)."""
    x = _randn(6, 5, 96, seed=17, scale=2.0).requires_grad_(True)
    w = torch.nn.Parameter(_randn(40, 96, seed=18, scale=0.05))
    dy = _randn(6, 5, 40, seed=19)
    scale = _randn(40, seed=20).abs() + 0.25 if per_row else torch.tensor(0.3125, device=DEV)
    outs = {}
    for be in ("torch", "triton", "unfolded"):
        xx = x.detach().clone().requires_grad_(True)
        ww = torch.nn.Parameter(w.detach().clone())
        if fusion:
            ww.main_grad = torch.zeros(ww.shape, device=DEV)
        kwargs = dict(gradient_accumulation_fusion=fusion, dgrad=dimpl, wgrad=wimpl)
        if be == "unfolded":
            y = F.bitnet_linear(xx, ww, backend="torch", **kwargs) * scale
        else:
            cache = F.BitNetWeightCache()
            kwargs.update(output_scale=scale, weight_cache=cache)
            y = F.bitnet_linear(xx, ww, backend=be, **kwargs)
            assert torch.equal(cache._value.t, F.quantize_weight(w.detach(), backend=be).t)
        y.backward(dy)
        outs[be] = (y.detach(), xx.grad, ww.main_grad if fusion else ww.grad)
    assert torch.equal(outs["triton"][0], outs["torch"][0])
    for be in ("torch", "triton"):
        for a, b in zip(outs[be], outs["unfolded"]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    unscaled = F.bitnet_linear(x.detach(), w.detach(), backend="torch")
    assert not torch.allclose(outs["triton"][0], unscaled, rtol=1e-2)


@pytest.mark.parametrize("dimpl", ["cublas", "cublas_cached", "triton"])
def test_weight_cache_holds_dense_copy_only_when_asked(dimpl):
    """Default: the per-step cache keeps int8 T only (1 byte/param); the bf16 beta*T operand
    of the cuBLAS input gradient is a temporary.  ``cublas_cached`` caches it for the step."""
    cache = F.BitNetWeightCache()
    w = torch.nn.Parameter(_randn(24, 32, seed=3, scale=0.05))
    for _ in range(2):  # second micro-batch hits the cache
        x = _randn(5, 32, seed=4).requires_grad_(True)
        F.bitnet_linear(x, w, weight_cache=cache, backend="triton", dgrad=dimpl).sum().backward()
    assert (cache.misses, cache.hits) == (1, 1)
    assert cache._value.t.dtype == torch.int8
    assert (cache._value.dense is not None) == (dimpl == "cublas_cached")
