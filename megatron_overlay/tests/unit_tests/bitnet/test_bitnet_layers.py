# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet tensor-parallel layers at TP=1 (single gloo rank, CPU, torch backend).

Against the explicit float64 formula (``bitnet_layer_helpers.ref_linear``): forward,
identity-STE gradients, per-segment betas (q / k / v of linear_qkv, gate / up of a gated
linear_fc1), bias / skip_bias_add, 3D inputs, gradient-accumulation fusion into main_grad, the
input RMSNorm (vs HF's LlamaRMSNorm), the weight cache, unsupported options, and
forward-multiplier composition.
"""

import pytest
import torch

pytest.importorskip("megatron.core.tensor_parallel", reason="needs the patched Megatron tree")

from megatron.core.bitnet import functional as F  # noqa: E402
from megatron.core.bitnet import layers as L  # noqa: E402
from tests.unit_tests.bitnet.bitnet_layer_helpers import (  # noqa: E402
    FFN,
    GROUPS,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    QKV_OUT,
    assert_close,
    assert_forward_close,
    config_with,
    init_normal,
    make_config,
    ref_linear,
    segment_ids_full,
)
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: E402,F401 (fixture)


@pytest.fixture(autouse=True)
def _single_rank(single_rank):
    """Every test runs in a one-rank gloo world (layers on the torch backend: make_config)."""


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _column(role, out, config=None, **kw):
    config = config or make_config()
    kw.setdefault("bias", True)
    return L.BitNetColumnParallelLinear(
        HIDDEN, out, config=config, init_method=init_normal, role=role, **kw
    )


def _row(role, in_size, config=None, **kw):
    config = config or make_config()
    kw.setdefault("bias", True)
    kw.setdefault("input_is_parallel", True)
    kw.setdefault("skip_bias_add", False)
    return L.BitNetRowParallelLinear(
        in_size, HIDDEN, config=config, init_method=init_normal, role=role, **kw
    )


def _set_weight(layer, w, bias=None):
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    F.invalidate_weight_caches(layer)  # .copy_ under no_grad bumps _version, but be explicit


def _segment_scaled_weight(seg, k, seed, scales=(0.02, 0.1, 0.5)):
    """Random weight whose logical matrices have clearly different magnitudes."""
    return (
        _rand(seg.numel(), k, seed=seed) * torch.tensor(scales)[: int(seg.max()) + 1][seg][:, None]
    )


@pytest.mark.parametrize(
    "role,out,gated,nseg",
    [
        ("linear_qkv", QKV_OUT, True, 3),
        ("linear_fc1", 2 * FFN, True, 2),
        ("linear_fc1", FFN, False, 1),
    ],
)
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_column_forward_and_ste_vs_formula(role, out, gated, nseg, skip_bias_add):
    config = make_config(gated_linear_unit=gated)
    layer = _column(role, out, config, skip_bias_add=skip_bias_add)
    seg = segment_ids_full(role, out, gated)
    w = _segment_scaled_weight(seg, HIDDEN, seed=1)
    b = _rand(out, seed=2, scale=0.1)
    _set_weight(layer, w, b)
    x = _rand(5, 3, HIDDEN, seed=3, scale=2.0).requires_grad_(True)  # [s, b, h]
    dy = _rand(5, 3, out, seed=4)

    y, out_bias = layer(x)
    ref = ref_linear(x, w, seg, None if skip_bias_add else b, dy)
    assert y.shape == (5, 3, out)
    if skip_bias_add:
        assert out_bias is layer.bias
        assert_forward_close(y, ref)
    else:
        assert out_bias is None
        assert_forward_close(y, ref, b)
    # quantisation: one beta per logical matrix, T exactly as the formula
    wq = layer.bitnet_quantized_weight()
    assert torch.equal(wq.t, ref["t"])
    beta_rows = wq.beta.expand(out) if wq.beta.dim() == 0 else wq.beta
    assert torch.equal(beta_rows, ref["beta"])
    assert (wq.beta.dim() == 0) == (nseg == 1)
    assert len(set(ref["beta"].tolist())) == nseg
    assert len(layer.bitnet_segment_names) == nseg
    betas = layer.bitnet_segment_betas()
    assert list(betas) == list(layer.bitnet_segment_names)
    for i, name in enumerate(layer.bitnet_segment_names):
        assert betas[name].dim() == 0 and torch.all(ref["beta"][seg == i] == betas[name])

    y.backward(dy)
    assert_close(x.grad, ref["dx"])
    assert_close(layer.weight.grad, ref["dw"])
    if not skip_bias_add:
        assert_close(layer.bias.grad, ref["db"])


def test_qkv_with_attention_output_gate_has_a_gate_segment():
    """--attention-output-gate: every query group is [q heads, gate heads, k, v] (upstream
    SelfAttention), four logical matrices with four betas.  Its 96 rows are also three groups of
    the ungated 32-row [q, k, v] block, so the row count alone cannot catch a wrong layout."""
    config = make_config(attention_output_gate=True)
    query_rows = HEADS // GROUPS * HEAD_DIM
    block = [0] * query_rows + [1] * query_rows + [2] * HEAD_DIM + [3] * HEAD_DIM
    seg = torch.tensor(block * GROUPS)
    out = seg.numel()
    layer = _column("linear_qkv", out, config, bias=False)
    assert layer.bitnet_segment_names == ("q", "gate", "k", "v")
    w = _segment_scaled_weight(seg, HIDDEN, seed=31, scales=(0.02, 0.1, 0.5, 2.0))
    _set_weight(layer, w)
    x = _rand(4, 2, HIDDEN, seed=32, scale=2.0)
    y, _ = layer(x)
    ref = ref_linear(x, w, seg)
    assert torch.equal(layer.bitnet_quantized_weight().beta, ref["beta"])
    assert len(set(ref["beta"].tolist())) == 4
    assert_forward_close(y, ref)
    betas = layer.bitnet_segment_betas()
    for i, name in enumerate(layer.bitnet_segment_names):
        assert torch.all(ref["beta"][seg == i] == betas[name]), name


@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_row_forward_and_ste_vs_formula(skip_bias_add):
    layer = _row("linear_proj", FFN, skip_bias_add=skip_bias_add)
    seg = segment_ids_full("linear_proj", HIDDEN)
    w = _rand(HIDDEN, FFN, seed=5, scale=0.05)
    b = _rand(HIDDEN, seed=6, scale=0.1)
    _set_weight(layer, w, b)
    x = _rand(4, 2, FFN, seed=7, scale=2.0).requires_grad_(True)
    dy = _rand(4, 2, HIDDEN, seed=8)
    y, out_bias = layer(x)
    ref = ref_linear(x, w, seg, None if skip_bias_add else b, dy)
    if skip_bias_add:
        assert out_bias is layer.bias
        assert_forward_close(y, ref)
    else:
        assert out_bias is None
        assert_forward_close(y, ref, b)
    wq = layer.bitnet_quantized_weight()
    assert wq.beta.dim() == 0 and torch.equal(wq.beta.expand(HIDDEN), ref["beta"])
    assert torch.equal(wq.t, ref["t"])
    y.backward(dy)
    assert_close(x.grad, ref["dx"])
    assert_close(layer.weight.grad, ref["dw"])
    if not skip_bias_add:
        assert_close(layer.bias.grad, ref["db"])


def test_row_not_parallel_input_and_no_bias():
    layer = _row("linear_fc2", FFN, bias=False, input_is_parallel=False)
    w = _rand(HIDDEN, FFN, seed=9, scale=0.05)
    _set_weight(layer, w)
    x = _rand(6, FFN, seed=10, scale=2.0).requires_grad_(True)  # 2D input works too
    y, out_bias = layer(x)
    assert out_bias is None
    ref = ref_linear(x, w, segment_ids_full("linear_fc2", HIDDEN), None, _rand(6, HIDDEN, seed=11))
    assert_forward_close(y, ref)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_gradient_accumulation_fusion_into_main_grad(kind):
    # ColumnParallelLinear would reject the flag without apex; the BitNet layer accepts it
    config = make_config(gradient_accumulation_fusion=True)
    if kind == "column":
        layer = _column("linear_qkv", QKV_OUT, config)
        seg = segment_ids_full("linear_qkv", QKV_OUT)
        w = _segment_scaled_weight(seg, HIDDEN, seed=12)
        in_size, out = HIDDEN, QKV_OUT
    else:
        layer = _row("linear_fc2", FFN, config)
        seg = segment_ids_full("linear_fc2", HIDDEN)
        w = _rand(HIDDEN, FFN, seed=12, scale=0.05)
        in_size, out = FFN, HIDDEN
    assert layer.config is config and layer.gradient_accumulation_fusion
    _set_weight(layer, w)
    layer.weight.main_grad = torch.zeros_like(layer.weight)
    expected = torch.zeros(w.shape, dtype=torch.float64)
    for seed in (13, 14):  # two micro-batches accumulate
        x = _rand(3, 2, in_size, seed=seed, scale=2.0)
        dy = _rand(3, 2, out, seed=seed + 100)
        y, _ = layer(x)
        y.backward(dy)
        expected += ref_linear(x, w, seg, None, dy)["dw"]
    assert layer.weight.grad is None
    assert_close(layer.weight.main_grad, expected, rtol=2e-6)


def test_weight_cache_once_per_step(monkeypatch):
    layer = _column("linear_qkv", QKV_OUT)
    calls = []
    original = L.BitNetLinearMixin.bitnet_weight_scale

    def counting(self, weight=None):
        calls.append(1)
        return original(self, weight)

    monkeypatch.setattr(L.BitNetLinearMixin, "bitnet_weight_scale", counting)
    x = _rand(2, 2, HIDDEN, seed=15)
    for _ in range(3):  # micro-batches of one step
        layer(x)[0].sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        layer.weight.data.mul_(-1.0)  # Megatron-style write: only the step hook notices
    F.invalidate_weight_caches(layer)  # what the optimizer-step hook does
    y, _ = layer(x)
    assert len(calls) == 2
    ref = ref_linear(x, layer.weight.detach(), segment_ids_full("linear_qkv", QKV_OUT), layer.bias)
    assert_forward_close(y, ref, layer.bias)


def test_no_host_sync(monkeypatch):
    config = make_config(gradient_accumulation_fusion=True)
    col = _column("linear_qkv", QKV_OUT, config)
    row = _row("linear_proj", QKV_OUT, config)
    for layer in (col, row):
        layer.weight.main_grad = torch.zeros_like(layer.weight)
    x = _rand(3, 2, HIDDEN, seed=16).requires_grad_(True)

    def boom(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    for _ in range(2):
        F.invalidate_weight_caches([col, row])
        h, _ = col(x)
        y, _ = row(h)
        y.sum().backward()


def test_rms_norm_matches_hf_semantics_and_trains():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    eps = 1e-6
    config = make_config(bitnet_rms_norm=True)
    layer = _column("linear_fc1", 2 * FFN, config)
    assert isinstance(layer.rms_norm, L.BitNetInputRMSNorm)
    assert "rms_norm.weight" in layer.state_dict()
    seg = segment_ids_full("linear_fc1", 2 * FFN)
    w = _segment_scaled_weight(seg, HIDDEN, seed=17)
    norm_w = 1.0 + 0.3 * _rand(HIDDEN, seed=18)
    _set_weight(layer, w, torch.zeros(2 * FFN))
    with torch.no_grad():
        layer.rms_norm.weight.copy_(norm_w)
    x = _rand(4, 3, HIDDEN, seed=19, scale=3.0).requires_grad_(True)
    dy = _rand(4, 3, 2 * FFN, seed=20)

    hf = modeling_llama.LlamaRMSNorm(HIDDEN, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(norm_w)
    xn_hf = hf(x.detach())
    xn = layer.rms_norm(x.detach())
    # fp64 vs fp32 accumulation of the mean square: each is within ~3 fp32 ulps of the exact
    # value, so they agree to a few ulps
    assert torch.allclose(xn, xn_hf, rtol=8 * 2**-24, atol=0)
    x64 = x.detach().double()
    exact = norm_w.double() * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    assert torch.all((xn.double() - exact).abs() <= 4 * 2**-24 * exact.abs())

    y, _ = layer(x)
    assert_forward_close(y, ref_linear(xn, w, seg, layer.bias))
    y.backward(dy)

    # identity-STE reference through a float64 norm: y = x_ste @ Wq^T with
    # x_ste = n(x) + (x_q - n(x)).detach(), x_q from the quantisation of the layer's n(x)
    ref = ref_linear(xn, w, seg, None, dy)
    x64 = x.detach().double().requires_grad_(True)
    g64 = norm_w.double().requires_grad_(True)
    n64 = g64 * (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps))
    xq = ref["q"].double() * (ref["gamma"].double() / 127.0)[:, None]
    x_ste = n64 + (xq.reshape(n64.shape) - n64).detach()
    wq = ref["t"].double() * ref["beta"].double()[:, None]
    (x_ste @ wq.t()).backward(dy.double())
    assert_close(x.grad, x64.grad, rtol=1e-5)
    assert_close(layer.rms_norm.weight.grad, g64.grad, rtol=1e-5)
    assert_close(layer.weight.grad, ref["dw"], rtol=1e-5)


def test_rms_norm_row_parallel_sharded_attributes():
    layer = _row("linear_proj", FFN, make_config(bitnet_rms_norm=True, bitnet_rms_norm_eps=1e-5))
    assert layer.rms_norm.eps == 1e-5 and layer.rms_norm.weight.shape == (FFN,)
    assert layer.rms_norm.weight.tensor_model_parallel and layer.rms_norm.weight.partition_dim == 0


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("delay_wgrad_compute", True, "delay_wgrad_compute"),
        ("fp8", "hybrid", "fp8"),
        ("fp4", "e2m1", "fp4"),
        ("defer_embedding_wgrad_compute", True, "defer_embedding_wgrad_compute"),
    ],
)
def test_unsupported_config_options_raise(option, value, match):
    config = config_with(make_config(), **{option: value})
    with pytest.raises(NotImplementedError, match=match):
        _column("linear_qkv", QKV_OUT, config)
    with pytest.raises(NotImplementedError, match=match):
        _row("linear_proj", FFN, config)


def test_expert_mode_raises():
    with pytest.raises(NotImplementedError, match="is_expert"):
        _column("linear_fc1", 2 * FFN, is_expert=True)
    with pytest.raises(NotImplementedError, match="is_expert"):
        _row("linear_fc2", FFN, is_expert=True)


def test_bad_qkv_layout_raises():
    with pytest.raises(ValueError, match="query groups"):
        _column("linear_qkv", QKV_OUT - 8)


def test_rms_norm_with_disable_grad_reduce_raises():
    with pytest.raises(NotImplementedError, match="disable_grad_reduce"):
        _column("linear_fc1", 2 * FFN, make_config(bitnet_rms_norm=True), disable_grad_reduce=True)


def test_role_is_a_constructor_parameter():
    """Plain classes told their role by the spec: no classes generated per role."""
    layer = _column("linear_qkv", QKV_OUT)
    assert type(layer) is L.BitNetColumnParallelLinear and layer.bitnet_role == "linear_qkv"
    assert layer.forward_multipliers is None  # multipliers only when the spec asks for them
    assert _row("linear_fc2", FFN).bitnet_role == "linear_fc2"
    with pytest.raises(ValueError, match="identifier"):
        _column("linear qkv", QKV_OUT)
    assert not [name for name in dir(L) if name.startswith("BitNetColumnParallelLinearFor")]


# role, kind, multiplier config fields, (input multiplier, per-channel output scale of the role)
FOLD_CASES = {
    "qkv_in_and_key": (
        "linear_qkv",
        "column",
        dict(attention_in_multiplier=1.7, key_multiplier=0.39),
    ),
    "fc1_gate": ("linear_fc1", "column", dict(mlp_multipliers=[0.37, 1.0])),
    "proj_out": ("linear_proj", "row", dict(attention_out_multiplier=0.9375)),
    "fc2_down": ("linear_fc2", "row", dict(mlp_multipliers=[1.0, 0.8])),
}


def _fold_case(name, **config_extra):
    """(layer with multipliers, the same layer without, weight, segment ids, input size, c, v):
    ``c`` the input multiplier, ``v`` the output scale per channel (float64)."""
    from megatron.core.transformer.forward_multipliers import ForwardMultipliers

    role, kind, fields = FOLD_CASES[name]
    config = make_config(**fields, **config_extra)
    if kind == "column":
        out = QKV_OUT if role == "linear_qkv" else 2 * FFN
        build = lambda **kw: _column(role, out, config, bias=False, **kw)  # noqa: E731
        in_size, seg = HIDDEN, segment_ids_full(role, out)
        w = _segment_scaled_weight(seg, HIDDEN, seed=31)
    else:
        out, in_size = HIDDEN, (FFN if role == "linear_fc2" else QKV_OUT // 2)
        build = lambda **kw: _row(role, in_size, config, bias=False, **kw)  # noqa: E731
        seg = segment_ids_full(role, HIDDEN)
        w = _rand(HIDDEN, in_size, seed=31, scale=0.05)
    layer, plain = build(multipliers=True), build()
    _set_weight(layer, w)
    _set_weight(plain, w)
    fm = ForwardMultipliers(config, role, out, 1)
    v = fm.output_vector.double() if fm.output_vector is not None else torch.tensor(fm.output)
    return layer, plain, w, seg, in_size, fm.input, v.double()


@pytest.mark.parametrize("name", sorted(FOLD_CASES))
def test_forward_multipliers_fold_into_the_weight_scale(name):
    """Multipliers ride in beta: ``y = c v (x_q W_q^T)``, ``dX = c (dY v) W_q``,
    ``dW = c v (dY^T x_q)`` against the float64 formula (fp32 roundings only); the exported
    (unscaled) beta is the plain layer's."""
    layer, plain, w, seg, in_size, c, v = _fold_case(name)
    assert layer._folds_multipliers(bias_in_product=False)
    x = _rand(3, 2, in_size, seed=32, scale=2.0).requires_grad_(True)
    dy = _rand(3, 2, w.shape[0], seed=33)
    y, bias = layer(x)
    assert bias is None
    y.backward(dy)
    ref = ref_linear(x, w, seg, None, dy * v.float())
    scaled = {"y": ref["y"] * c * v, "y_nobias": ref["y_nobias"] * c * v}
    assert_forward_close(y, scaled)
    assert_close(x.grad, ref["dx"] * c)
    assert_close(layer.weight.grad, ref["dw"] * c, rtol=2e-6)
    assert torch.equal(layer.bitnet_quantized_weight().beta, plain.bitnet_quantized_weight().beta)
    assert torch.equal(layer.bitnet_quantized_weight().t, plain.bitnet_quantized_weight().t)


@pytest.mark.parametrize("name", ["qkv_in_and_key", "proj_out"])
def test_folded_multipliers_with_gradient_accumulation_fusion(name):
    layer, _, w, seg, in_size, c, v = _fold_case(name, gradient_accumulation_fusion=True)
    layer.weight.main_grad = torch.zeros_like(layer.weight)
    expected = torch.zeros(w.shape, dtype=torch.float64)
    for seed in (34, 35):  # two micro-batches accumulate
        x = _rand(3, 2, in_size, seed=seed, scale=2.0)
        dy = _rand(3, 2, w.shape[0], seed=seed + 100)
        y, _ = layer(x)
        y.backward(dy)
        expected += ref_linear(x, w, seg, None, dy * v.float())["dw"] * c
    assert layer.weight.grad is None
    assert_close(layer.weight.main_grad, expected, rtol=2e-6)


@pytest.mark.parametrize("name", sorted(FOLD_CASES))
def test_folded_multipliers_add_no_pass_over_the_activations(name):
    """With the fold, a layer with multipliers runs as many ops on input- or output-sized
    tensors (forward + backward) as the same layer without: no ``x * c``, ``y * v``, ``dY * v``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, plain, w, _, in_size, _, _ = _fold_case(name)
    sizes = {3 * 2 * in_size, 3 * 2 * w.shape[0]}
    assert w.numel() not in sizes

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, torch.Tensor) and first.numel() in sizes:
                self.ops.append(func.__name__)
            return out

    counts = {}
    for label, module in (("multipliers", layer), ("plain", plain)):
        module(_rand(3, 2, in_size, seed=36))  # fill the weight cache first
        x = _rand(3, 2, in_size, seed=36).requires_grad_(True)
        with Count() as mode:
            y, _ = module(x)
            y.backward(torch.ones_like(y))
        counts[label] = sorted(mode.ops)
    assert counts["multipliers"] == counts["plain"]


def test_input_multiplier_stays_before_the_bitnet_rms_norm():
    """RMSNorm is not scale-invariant (eps): the input multiplier is applied before it, only the
    output scale is folded."""
    layer, plain, w, seg, in_size, c, v = _fold_case("qkv_in_and_key", bitnet_rms_norm=True)
    assert not layer._folded_input()
    with torch.no_grad():
        plain.rms_norm.weight.copy_(layer.rms_norm.weight)
    x = _rand(3, 2, in_size, seed=37, scale=1e-3)  # small: eps matters, c x != c (x)
    y, _ = layer(x)
    y_plain, _ = plain(x * c)
    assert_close(y, y_plain.double() * v, rtol=1e-6)
    y_wrong, _ = plain(x)  # the input multiplier moved past the norm would give this
    assert not torch.allclose(y.double(), y_wrong.double() * c * v, rtol=1e-3)


def test_bias_inside_the_product_is_scaled_with_it_unfolded():
    """``(x W^T + b) * v`` (bias added inside the BitNet product): no fold, the old order."""
    gate_mult = 0.37
    config = make_config(mlp_multipliers=[gate_mult, 1.0])
    layer = _column("linear_fc1", 2 * FFN, config, bias=True, multipliers=True)
    plain = _column("linear_fc1", 2 * FFN, config, bias=True)
    assert not layer._folds_multipliers(bias_in_product=True)
    seg = segment_ids_full("linear_fc1", 2 * FFN)
    w = _segment_scaled_weight(seg, HIDDEN, seed=21)
    b = _rand(2 * FFN, seed=23)
    _set_weight(layer, w, b)
    _set_weight(plain, w, b)
    x = _rand(3, 2, HIDDEN, seed=22, scale=2.0)
    y, _ = layer(x)
    y_plain, _ = plain(x)
    assert torch.equal(y[..., :FFN], y_plain[..., :FFN] * gate_mult)
    assert torch.equal(y[..., FFN:], y_plain[..., FFN:])
    assert layer.bitnet_role == "linear_fc1" and layer.forward_multipliers.role == "linear_fc1"
    assert layer.bitnet_segment_names == ("gate", "up")


@pytest.mark.parametrize("kind", ["column", "row"])
def test_triton_backend_matches_torch_backend(kind, monkeypatch):
    """The layers on the Triton backend (CUDA, or the CPU interpreter): same T, beta, output."""
    if not F.triton_available():
        pytest.skip("triton is not importable")
    from megatron.core.bitnet import triton_kernels as tk

    if not (tk.interpret_mode() or torch.cuda.is_available()):
        pytest.skip("no CUDA device and triton was imported without TRITON_INTERPRET=1")
    if torch.cuda.is_available() and not tk.interpret_mode():
        pytest.skip("CPU layers: on a GPU the kernel tests cover the Triton backend")
    monkeypatch.setenv("BITNET_TRITON_AUTOTUNE", "0")
    outs = {}
    for backend in ("torch", "triton"):
        config = make_config(bitnet_backend=backend)
        if kind == "column":
            layer = _column("linear_qkv", QKV_OUT, config)
            seg = segment_ids_full("linear_qkv", QKV_OUT)
            w = _segment_scaled_weight(seg, HIDDEN, seed=23)
            x = _rand(3, 2, HIDDEN, seed=24, scale=2.0).requires_grad_(True)
        else:
            layer = _row("linear_proj", FFN, config)
            w = _rand(HIDDEN, FFN, seed=23, scale=0.05)
            x = _rand(3, 2, FFN, seed=24, scale=2.0).requires_grad_(True)
        _set_weight(layer, w, torch.zeros_like(layer.bias))
        y, _ = layer(x)
        y.backward(torch.ones_like(y))
        wq = layer.bitnet_quantized_weight()
        outs[backend] = (wq.t, wq.beta, y.detach(), x.grad, layer.weight.grad)
    for a, b in zip(outs["triton"][:3], outs["torch"][:3]):
        assert torch.equal(a, b)
    for a, b in zip(outs["triton"][3:], outs["torch"][3:]):
        assert_close(a, b, rtol=1e-5)
