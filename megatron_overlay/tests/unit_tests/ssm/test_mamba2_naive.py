# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""The naive Mamba-2 references (tests/unit_tests/ssm/mamba2_naive.py) and our pure-PyTorch ops
against them, float64 on CPU.

1. The references themselves: hand-computed values for tiny inputs, and their autograd
   gradients against central finite differences (``torch.autograd.gradcheck``).
2. Our ops (megatron/core/ssm/mamba2_torch.py) against the references: values of every option
   the GPU kernel comparison exercises (groups, D per head / channel, z gate, dt bias + softplus
   + limits, initial and final states, packed ``seq_idx`` incl. padding, varlen states, conv
   update, decode step, fused split path), and gradients both against finite differences and
   against the references' autograd gradients.

Tolerances: our ops evaluate the same sums in another order (chunked scan, segment sums in log
space), so float64 results agree to round-off, not bit for bit: rtol 1e-10 / atol 1e-12 for
values and reference gradients. gradcheck uses its float64 defaults (eps 1e-6, atol 1e-5,
rtol 1e-3), which bound the finite-difference truncation error; for our ops it runs in
fast mode (random vector-Jacobian products instead of every entry: the full Jacobian of the
chunked scan costs minutes), while the comparison with the references' gradients covers every
entry.
"""

import math

import pytest
import torch

from megatron.core.ssm import mamba2_torch as m2
from tests.unit_tests.ssm.mamba2_cases import (
    conv_inputs,
    fresh_leaves,
    naive_conv_gradcheck_problem,
    naive_scan_gradcheck_problem,
    packed,
    reference_grads,
)
from tests.unit_tests.ssm.mamba2_cases import scan_inputs as shared_scan_inputs
from tests.unit_tests.ssm.mamba2_cases import split_inputs
from tests.unit_tests.ssm.mamba2_naive import (
    naive_conv,
    naive_rmsnorm,
    naive_scan,
    naive_split_conv1d_scan,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def scan_inputs(l=11, **kw):
    """The shared scan inputs with a signed pre-softplus dt (``signed_dt``)."""
    return shared_scan_inputs(l=l, signed_dt=True, **kw)


# --------------------------------------------------------------------------------------------
# 1. The references
# --------------------------------------------------------------------------------------------


def test_naive_scan_hand_computed():
    """One head, headdim 1, dstate 1: the recurrence evaluated with Python floats."""
    xs, dts, Bs, Cs = [0.5, -1.0, 2.0], [0.1, 0.7, 0.3], [1.5, -0.5, 0.25], [2.0, 1.0, -3.0]
    a, d, h0, z = -0.8, 0.3, 0.4, [0.2, -1.0, 3.0]
    h, expected = h0, []
    for t in range(3):
        h = math.exp(dts[t] * a) * h + dts[t] * xs[t] * Bs[t]
        y = Cs[t] * h + d * xs[t]
        expected.append(y * z[t] / (1 + math.exp(-z[t])))
    view = lambda v: torch.tensor(v, dtype=F64).view(1, 3, 1, 1)  # noqa: E731
    y, final = naive_scan(
        view(xs),
        torch.tensor(dts, dtype=F64).view(1, 3, 1),
        torch.tensor([a], dtype=F64),
        view(Bs),
        view(Cs),
        D=torch.tensor([d], dtype=F64),
        z=view(z),
        initial_states=torch.tensor(h0, dtype=F64).view(1, 1, 1, 1),
    )
    torch.testing.assert_close(y.flatten(), torch.tensor(expected, dtype=F64), **TOL)
    assert final.item() == pytest.approx(h, rel=1e-14)


def test_naive_scan_resets_at_sequence_boundaries():
    """With seq_idx, each packed sequence equals a separate run from a zero state, except the
    one with id 0, which starts from the initial state."""
    t = scan_inputs(b=1, l=9, g=1)
    seq_idx = packed([[4, 2, 3]])
    y, _ = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], initial_states=t["init"], seq_idx=seq_idx
    )
    for start, stop, init in ((0, 4, t["init"]), (4, 6, None), (6, 9, None)):
        part, _ = naive_scan(
            *(t[k][:, start:stop] for k in ("x", "dt")),
            t["A"],
            *(t[k][:, start:stop] for k in ("B", "C")),
            initial_states=init,
        )
        torch.testing.assert_close(y[:, start:stop], part, rtol=0, atol=0)


def test_naive_conv_hand_computed():
    """Width 3, one channel, with initial states, bias, seq_idx (boundary and padding)."""
    x, w, bias, init = [1.0, 2.0, -1.0, 3.0, 5.0], [0.5, -1.0, 2.0], 0.25, [4.0, -2.0]
    ids = [0, 0, 1, 1, -1]
    u, uid = init + x, [0, 0] + ids  # the initial states belong to the first token's sequence
    expected = []
    for t in range(5):
        if ids[t] < 0:
            expected.append(0.0)
            continue
        acc = bias + sum(w[k] * u[t + k] for k in range(3) if uid[t + k] == ids[t])
        expected.append(acc)
    out, final = naive_conv(
        torch.tensor(x, dtype=F64).view(1, 1, 5),
        torch.tensor([w], dtype=F64),
        torch.tensor([bias], dtype=F64),
        seq_idx=torch.tensor([ids], dtype=torch.int32),
        initial_states=torch.tensor(init, dtype=F64).view(1, 1, 2),
        return_final_states=True,
    )
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=F64), **TOL)
    assert final.flatten().tolist() == [3.0, 5.0]


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("variant", ["plain", "seq_idx_limit_dhp"])
def test_naive_scan_gradients_match_finite_differences(g, variant):
    fn, inputs = naive_scan_gradcheck_problem(naive_scan, g, variant)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("variant", ["plain", "init_final", "seq_idx_pad_init"])
def test_naive_conv_gradients_match_finite_differences(variant):
    fn, inputs = naive_conv_gradcheck_problem(naive_conv, variant)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_naive_rmsnorm_gradients_match_finite_differences(norm_before_gate):
    gen = _gen(4)
    x, z, w = (torch.randn(3, 8, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    fn = lambda x, z, w: naive_rmsnorm(x, w[0], z, 1e-5, 4, norm_before_gate)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x, z, w])


# --------------------------------------------------------------------------------------------
# 2. Our ops against the references
# --------------------------------------------------------------------------------------------


SCAN_VARIANTS = {  # name: (D key, use z, dt_bias + softplus, dt_limit, init, seq_idx lengths)
    "basic": (None, False, False, (0.0, math.inf), False, None),
    "D_h_z": ("D_h", True, False, (0.0, math.inf), False, None),
    "softplus_limit_D_hp_init": ("D_hp", True, True, (0.01, 0.5), True, None),
    "seq_idx_init": ("D_h", True, True, (0.0, math.inf), True, [[3, 1, 7], [11]]),
}


def _scan_kwargs(t, variant, dt_key="dt"):
    d_key, use_z, softplus, limit, init, lengths = SCAN_VARIANTS[variant]
    return dict(
        D=t[d_key] if d_key else None,
        z=t["z"] if use_z else None,
        dt_bias=t["dt_bias"] if softplus else None,
        dt_softplus=softplus,
        dt_limit=limit,
        initial_states=t["init"] if init else None,
        seq_idx=packed(lengths) if lengths else None,
    )


@pytest.mark.parametrize("variant", list(SCAN_VARIANTS))
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_scan_values_match_naive(variant, g, chunk):
    t = scan_inputs(g=g)
    kw = _scan_kwargs(t, variant)
    if not kw["dt_softplus"]:
        t["dt"] = t["dt"].abs() + 0.05  # dt must be positive without softplus
    y, final = m2.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, return_final_states=True, **kw
    )
    y_ref, final_ref = naive_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], **kw)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final, final_ref, **TOL)


def test_scan_varlen_states_match_naive():
    t = scan_inputs(b=1, l=12, g=2)
    lengths = [5, 1, 6]
    seq_idx = packed([lengths])
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    _, _, varlen = m2.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 4, dt_bias=t["dt_bias"], dt_softplus=True,
        seq_idx=seq_idx, cu_seqlens=cu, return_final_states=True, return_varlen_states=True,
    )  # fmt: skip
    _, _, states = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], dt_bias=t["dt_bias"], dt_softplus=True,
        seq_idx=seq_idx, return_states=True,
    )  # fmt: skip
    torch.testing.assert_close(varlen, states[0, cu[1:].long() - 1], **TOL)


@pytest.mark.parametrize("variant", ["softplus_limit_D_hp_init", "seq_idx_init"])
@pytest.mark.parametrize("g", [1, 2])
def test_scan_gradients(variant, g):
    """Our scan's gradients: against finite differences and against the naive reference."""
    t = scan_inputs(b=2, l=6, h=2, p=2, g=g, n=3, seed=5)
    d_key = SCAN_VARIANTS[variant][0]
    lengths = [[2, 1, 3], [6]] if variant == "seq_idx_init" else None
    base = _scan_kwargs(t, variant)
    base["seq_idx"] = packed(lengths) if lengths else None
    names = ["x", "dt", "A", "B", "C", d_key, "z", "dt_bias", "init"]

    def call(scan, chunk=None):
        def fn(x, dt, A, B, C, D, z, dt_bias, init):
            kw = dict(base, D=D, z=z, dt_bias=dt_bias, initial_states=init)
            args = (x, dt, A, B, C) + ((chunk,) if chunk else ())
            if chunk:
                return scan(*args, return_final_states=True, **kw)
            return scan(*args, **kw)

        return fn

    ours, ref = call(m2.mamba_chunk_scan_combined, chunk=4), call(naive_scan)
    values = [t[k] for k in names]
    assert torch.autograd.gradcheck(ours, fresh_leaves(values), fast_mode=True)
    g_ours, g_ref = reference_grads(ours, ref, values)
    for name, a, b in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")


CONV_VARIANTS = {  # name: (bias, activation, initial states, final states, seq_idx rows)
    "plain": (True, None, False, False, None),
    "silu_no_bias": (False, "silu", False, False, None),
    "init_final": (True, "silu", True, True, None),
    "seq_idx_pad": (True, "silu", False, False, ([[3, 4], [7]], 2)),
    "seq_idx_pad_init": (True, "silu", True, False, ([[1, 6], [7]], 2)),
}


def _conv_call(fn, variant, seq_idx):
    bias_on, act, init_on, final_on, _ = CONV_VARIANTS[variant]

    def call(x, weight, bias, init):
        return fn(
            x,
            weight,
            bias if bias_on else None,
            seq_idx=seq_idx,
            initial_states=init if init_on else None,
            return_final_states=final_on,
            activation=act,
        )

    return call


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("width", [2, 4])
def test_conv_values_and_gradients(variant, width):
    t = conv_inputs(d=3, l=9, w=width)
    spec = CONV_VARIANTS[variant][4]
    seq_idx = packed(*spec) if spec else None
    ours = _conv_call(m2.causal_conv1d_fn, variant, seq_idx)
    ref = _conv_call(naive_conv, variant, seq_idx)
    values = [t["x"], t["weight"], t["bias"], t["init"]]
    out, out_ref = ours(*values), ref(*values)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert torch.autograd.gradcheck(ours, fresh_leaves(values), fast_mode=True)
    g_ours, g_ref = reference_grads(ours, ref, values)
    for name, a, b in zip(("x", "weight", "bias", "init"), g_ours, g_ref):
        if a is None or b is None:
            assert a is None and b is None or torch.count_nonzero(a if b is None else b) == 0
            continue
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")


def test_conv_update_matches_naive():
    """Decode steps continue the convolution from the state: one token at a time equals the
    reference over the whole sequence preceded by the initial state."""
    t = conv_inputs(d=3, l=9, w=4)
    state = t["init"].clone()
    steps = [
        m2.causal_conv1d_update(t["x"][:, :, s], state, t["weight"], t["bias"], "silu")
        for s in range(t["x"].shape[-1])
    ]
    ref, final = naive_conv(
        t["x"], t["weight"], t["bias"], initial_states=t["init"], activation="silu",
        return_final_states=True,
    )  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, dim=-1), ref, **TOL)
    torch.testing.assert_close(state, final, rtol=0, atol=0)


def test_selective_state_update_matches_naive():
    t = scan_inputs(l=3, g=2)
    h, p = 4, 3
    state = t["init"].clone()
    outs = []
    for s in range(3):
        outs.append(
            m2.selective_state_update(
                state, t["x"][:, s], t["dt"][:, s, :, None].expand(-1, -1, p),
                t["A"].view(h, 1, 1).expand(h, p, 5), t["B"][:, s], t["C"][:, s],
                D=t["D_h"].view(h, 1).expand(h, p), z=t["z"][:, s],
                dt_bias=t["dt_bias"].view(h, 1).expand(h, p), dt_softplus=True,
            )  # fmt: skip
        )
    ref, final = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D_h"], z=t["z"], dt_bias=t["dt_bias"],
        dt_softplus=True, initial_states=t["init"],
    )  # fmt: skip
    torch.testing.assert_close(torch.stack(outs, dim=1), ref, **TOL)
    torch.testing.assert_close(state, final, **TOL)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_rmsnorm_values_and_gradients(norm_before_gate, group_size):
    gen = _gen(6)
    values = [torch.randn(3, 8, generator=gen, dtype=F64) for _ in range(2)]
    values.append(1 + 0.2 * torch.randn(8, generator=gen, dtype=F64))
    ours = lambda x, z, w: m2.rms_norm_gated(  # noqa: E731
        x, w, None, z, 1e-5, group_size, norm_before_gate
    )
    ref = lambda x, z, w: naive_rmsnorm(x, w, z, 1e-5, group_size, norm_before_gate)  # noqa: E731
    torch.testing.assert_close(ours(*values), ref(*values), **TOL)
    assert torch.autograd.gradcheck(ours, fresh_leaves(values), fast_mode=True)
    for a, b in zip(*reference_grads(ours, ref, values)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("variant", ["megatron_seq_idx", "norm_outproj_states", "d_nonssm"])
def test_split_path_values_and_gradients(variant):
    """The fused path as MambaMixer calls it (seq_idx, no norm / out_proj) and with everything
    (gated norm, out_proj with bias, initial and final states, D per channel, d_nonssm)."""
    g, p = 2, 2
    d_nonssm = 2 if variant == "d_nonssm" else 0
    t = split_inputs(h=2, p=p, g=g, n=2, d_nonssm=d_nonssm, l=7, seed=7, near_one_norm=True)
    full = variant != "megatron_seq_idx"
    seq_idx = None if full else packed([[3, 4], [7]])
    names = ["zxbcdt", "conv_w", "conv_b", "dt_bias", "A", "D_hp" if full else "D_h"]
    names += ["norm_w", "out_w", "out_b", "init"] if full else []

    def ours(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w=None, out_w=None, out_b=None,init=None):  # fmt: skip
        res = m2.mamba_split_conv1d_scan_combined(
            zxbcdt, conv_w, conv_b, dt_bias, A, D, 4, initial_states=init, seq_idx=seq_idx,
            return_final_states=full, activation="silu", rmsnorm_weight=norm_w,
            rmsnorm_eps=1e-5, outproj_weight=out_w, outproj_bias=out_b,
            headdim=None if full else p, ngroups=g, norm_before_gate=False,
        )  # fmt: skip
        return res

    def ref(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w=None, out_w=None, out_b=None,init=None):  # fmt: skip
        out, final = naive_split_conv1d_scan(
            zxbcdt, conv_w, conv_b, dt_bias, A, D, p, g, initial_states=init, seq_idx=seq_idx,
            rmsnorm_weight=norm_w, rmsnorm_eps=1e-5, norm_before_gate=False,
            outproj_weight=out_w, outproj_bias=out_b,
        )  # fmt: skip
        return (out, final) if full else out

    values = [t[k] for k in names]
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (ours(*values), ref(*values)))):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.autograd.gradcheck(ours, fresh_leaves(values), fast_mode=True)
    for name, a, b in zip(names, *reference_grads(ours, ref, values)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}: {m}")
