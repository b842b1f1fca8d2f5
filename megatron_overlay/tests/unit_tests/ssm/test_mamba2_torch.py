# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""CPU tests of the pure-PyTorch Mamba-2 ops (megatron/core/ssm/mamba2_torch.py).

Every op is checked against the independent, deliberately naive references of
tests/unit_tests/ssm/mamba2_naive.py (shared with test_mamba2_naive.py and the GPU kernel
comparison): a token-by-token SSM recurrence, a loop over output positions for the causal
convolution and the textbook RMSNorm formula. float64 comparisons use tight tolerances
(~1e-10), float32 ones ~1e-5.
"""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron.core.ssm import mamba2_torch as m2
from tests.unit_tests.ssm.mamba2_cases import (
    conv_inputs,
    grads_of,
    packed,
    scan_inputs,
    split_inputs,
)
from tests.unit_tests.ssm.mamba2_naive import naive_conv, naive_rmsnorm, naive_scan

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Chunked scan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("d_kind", [None, "h", "hp"])
@pytest.mark.parametrize("use_z", [False, True])
def test_scan_matches_naive_fp64(chunk_size, ngroups, d_kind, use_z):
    t = scan_inputs(g=ngroups)
    D = None if d_kind is None else t["D_" + d_kind]
    z = t["z"] if use_z else None
    y = m2.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=D, z=z)
    y_ref, _ = naive_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], D=D, z=z)
    assert y.dtype == F64 and y.shape == t["x"].shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seqlen", [1, 5, 16, 17, 48])
def test_scan_initial_and_final_states(seqlen):
    t = scan_inputs(l=seqlen)
    y, final = m2.mamba_chunk_scan_combined(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        16,
        D=t["D_h"],
        initial_states=t["init"],
        return_final_states=True,
    )
    y_ref, final_ref = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D_h"], initial_states=t["init"]
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_scan_dt_bias_softplus_limit():
    t = scan_inputs()
    dt_raw = torch.randn_like(t["dt"]) * 2.0  # pre-softplus values, some far out
    limit = (0.2, 1.1)  # clamps a good share of softplus(dt + bias) from both sides
    processed = F.softplus(dt_raw + t["dt_bias"])
    assert (processed < limit[0]).any() and (processed > limit[1]).any()
    kw = dict(D=t["D_hp"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=limit)
    y = m2.mamba_chunk_scan_combined(t["x"], dt_raw, t["A"], t["B"], t["C"], 8, **kw)
    y_ref, _ = naive_scan(t["x"], dt_raw, t["A"], t["B"], t["C"], **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    # pre-activations deep in softplus' linear regime stay finite and exact
    y_big = m2.mamba_chunk_scan_combined(
        t["x"], dt_raw + 30.0, t["A"], t["B"], t["C"], 8, dt_softplus=True
    )
    y_big_ref, _ = naive_scan(t["x"], dt_raw + 30.0, t["A"], t["B"], t["C"])
    torch.testing.assert_close(y_big, y_big_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_scan_fp32_matches_fp64_naive(ngroups):
    t = scan_inputs(g=ngroups, l=100)
    t32 = {k: v.float() for k, v in t.items()}
    y, final = m2.mamba_chunk_scan_combined(
        t32["x"],
        t32["dt"],
        t32["A"],
        t32["B"],
        t32["C"],
        32,
        D=t32["D_h"],
        z=t32["z"],
        initial_states=t32["init"],
        return_final_states=True,
    )
    y_ref, final_ref = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D_h"], z=t["z"], initial_states=t["init"]
    )
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_scan_long_sequence_decay_fp32():
    """Cumulative decay over the whole sequence is large; fp32 must stay accurate."""
    t = scan_inputs(b=1, l=600, h=2, p=2, g=1, n=3)
    t["A"] = torch.tensor([-8.0, -0.01], dtype=F64)  # cumulative log-decay ~ -2000 for head 0
    t32 = {k: v.float() for k, v in t.items()}
    y, final = m2.mamba_chunk_scan_combined(
        t32["x"], t32["dt"], t32["A"], t32["B"], t32["C"], 16, return_final_states=True
    )
    y_ref, final_ref = naive_scan(t["x"], t["dt"], t["A"], t["B"], t["C"])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 8, 16])
def test_scan_seq_idx_matches_naive_and_separate_runs(chunk_size):
    lengths = [[7, 8, 1, 16, 5], [16, 21]]  # boundaries inside and exactly at chunk edges
    l = sum(lengths[0])
    t = scan_inputs(l=l)
    seq_idx = packed(lengths)
    kw = dict(D=t["D_hp"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    y, final = m2.mamba_chunk_scan_combined(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        chunk_size,
        initial_states=t["init"],
        seq_idx=seq_idx,
        return_final_states=True,
        **kw,
    )
    y_ref, final_ref = naive_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], initial_states=t["init"], seq_idx=seq_idx, **kw
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)

    # Packing must equal running each sequence on its own (first one with the initial state).
    for bi, row in enumerate(lengths):
        start = 0
        for si, n in enumerate(row):
            sl = slice(start, start + n)
            part = m2.mamba_chunk_scan_combined(
                t["x"][bi : bi + 1, sl],
                t["dt"][bi : bi + 1, sl],
                t["A"],
                t["B"][bi : bi + 1, sl],
                t["C"][bi : bi + 1, sl],
                chunk_size,
                D=t["D_hp"],
                z=t["z"][bi : bi + 1, sl],
                dt_bias=t["dt_bias"],
                dt_softplus=True,
                initial_states=t["init"][bi : bi + 1] if si == 0 else None,
                return_final_states=True,
            )
            torch.testing.assert_close(y[bi : bi + 1, sl], part[0], rtol=1e-10, atol=1e-10)
            start += n
        torch.testing.assert_close(final[bi : bi + 1], part[1], rtol=1e-10, atol=1e-10)


def test_scan_varlen_states():
    lengths = [5, 11, 16, 3, 9]
    t = scan_inputs(b=1, l=sum(lengths))
    seq_idx = packed([lengths])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    y, final, varlen = m2.mamba_chunk_scan_combined(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        8,
        seq_idx=seq_idx,
        cu_seqlens=cu_seqlens,
        return_final_states=True,
        return_varlen_states=True,
    )
    assert varlen.shape == (len(lengths), 4, 3, 5)
    for i, n in enumerate(lengths):
        sl = slice(int(cu_seqlens[i]), int(cu_seqlens[i]) + n)
        _, st = naive_scan(t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl])
        torch.testing.assert_close(varlen[i : i + 1], st, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, varlen[-1:], rtol=1e-10, atol=1e-10)
    y_only, v_only = m2.mamba_chunk_scan_combined(
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        8,
        seq_idx=seq_idx,
        cu_seqlens=cu_seqlens,
        return_varlen_states=True,
    )
    torch.testing.assert_close(v_only, varlen)


@pytest.mark.parametrize("use_seq_idx", [False, True])
def test_scan_gradients_match_naive(use_seq_idx):
    t = scan_inputs(l=23, g=2)
    dt_raw = torch.randn_like(t["dt"])
    leaves = {
        "x": t["x"],
        "dt": dt_raw,
        "A": t["A"],
        "B": t["B"],
        "C": t["C"],
        "D": t["D_hp"] if not use_seq_idx else t["D_h"],
        "z": t["z"],
        "dt_bias": t["dt_bias"],
        "init": t["init"],
    }
    leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    seq_idx = packed([[6, 9, 8]]).expand(2, -1) if use_seq_idx else None
    limit = (0.1, 1.5)
    wy = torch.randn(t["x"].shape, dtype=F64)
    wf = torch.randn(t["init"].shape, dtype=F64)

    def loss(fn):
        def run():
            L = leaves
            y, fs = fn(L)
            return (y * wy).sum() + (fs * wf).sum()

        return run

    def chunked(L):
        return m2.mamba_chunk_scan_combined(
            L["x"],
            L["dt"],
            L["A"],
            L["B"],
            L["C"],
            8,
            D=L["D"],
            z=L["z"],
            dt_bias=L["dt_bias"],
            dt_softplus=True,
            dt_limit=limit,
            initial_states=L["init"],
            seq_idx=seq_idx,
            return_final_states=True,
        )

    def naive(L):
        return naive_scan(
            L["x"],
            L["dt"],
            L["A"],
            L["B"],
            L["C"],
            D=L["D"],
            z=L["z"],
            dt_bias=L["dt_bias"],
            dt_softplus=True,
            dt_limit=limit,
            initial_states=L["init"],
            seq_idx=seq_idx,
        )

    g_chunk = grads_of(loss(chunked), leaves)
    g_ref = grads_of(loss(naive), leaves)
    for k in leaves:
        assert torch.isfinite(g_chunk[k]).all(), k
        torch.testing.assert_close(g_chunk[k], g_ref[k], rtol=1e-9, atol=1e-9, msg=k)


def test_scan_bf16_io():
    t = scan_inputs(l=40)
    bf = {k: v.to(torch.bfloat16) for k, v in t.items()}
    y, final = m2.mamba_chunk_scan_combined(
        bf["x"],
        bf["dt"],
        t["A"].float(),
        bf["B"],
        bf["C"],
        16,
        D=t["D_h"].float(),
        z=bf["z"],
        return_final_states=True,
    )
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, ref_final = naive_scan(
        *(bf[k].double() for k in ("x", "dt")),
        t["A"].float().double(),
        bf["B"].double(),
        bf["C"].double(),
        D=t["D_h"].float().double(),
        z=bf["z"].double(),
    )
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(final.double(), ref_final, rtol=1e-5, atol=1e-5)


def test_scan_keeps_fp32_under_autocast():
    t = scan_inputs(l=40)
    t32 = {k: v.float() for k, v in t.items()}
    args = (t32["x"], t32["dt"], t32["A"], t32["B"], t32["C"], 16)
    kw = dict(D=t32["D_h"], z=t32["z"], initial_states=t32["init"], return_final_states=True)
    y, final = m2.mamba_chunk_scan_combined(*args, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, final_ac = m2.mamba_chunk_scan_combined(*args, **kw)
    assert y_ac.dtype == torch.float32
    torch.testing.assert_close(y_ac, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final_ac, final, rtol=1e-6, atol=1e-6)


def test_scan_rejects_bad_arguments():
    t = scan_inputs()
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 8)
    with pytest.raises(ValueError):
        m2.mamba_chunk_scan_combined(*args, D=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError):
        m2.mamba_chunk_scan_combined(*args, return_varlen_states=True)
    with pytest.raises(TypeError):
        m2.mamba_chunk_scan_combined(*args, not_an_argument=True)


def test_no_host_sync_meta_device():
    """Everything runs on the meta device, which has no data: proves no .item()/host reads."""
    meta = torch.device("meta")
    b, l, h, p, g, n = 2, 19, 4, 3, 2, 5
    r = lambda *s: torch.empty(*s, device=meta)  # noqa: E731
    seq_idx = torch.empty(b, l, dtype=torch.int32, device=meta)
    x = r(b, l, h, p).requires_grad_(True)
    y, final = m2.mamba_chunk_scan_combined(
        x,
        r(b, l, h),
        r(h),
        r(b, l, g, n),
        r(b, l, g, n),
        8,
        D=r(h),
        z=r(b, l, h, p),
        dt_bias=r(h),
        dt_softplus=True,
        initial_states=r(b, h, p, n),
        seq_idx=seq_idx,
        return_final_states=True,
    )
    (y.sum() + final.sum()).backward()
    assert y.shape == (b, l, h, p) and x.grad.shape == x.shape
    zx = r(b, l, 2 * h * p + 2 * g * n + h).requires_grad_(True)
    out = m2.mamba_split_conv1d_scan_combined(
        zx,
        r(h * p + 2 * g * n, 4),
        r(h * p + 2 * g * n),
        r(h),
        r(h),
        r(h),
        8,
        seq_idx=seq_idx,
        headdim=p,
        ngroups=g,
        rmsnorm_weight=r(h * p),
        outproj_weight=r(7, h * p),
        norm_before_gate=False,
    )
    out.sum().backward()
    assert out.shape == (b, l, 7) and zx.grad.shape == zx.shape
    state = r(5, h, p, n)
    m2.selective_state_update(
        state,
        r(b, h, p),
        r(b, h, p),
        r(h, p, n),
        r(b, g, n),
        r(b, g, n),
        D=r(h, p),
        dt_bias=r(h, p),
        dt_softplus=True,
        state_batch_indices=torch.empty(b, dtype=torch.int32, device=meta),
    )
    m2.causal_conv1d_update(
        r(b, 10),
        r(5, 10, 4),
        r(10, 4),
        r(10),
        "silu",
        conv_state_indices=torch.empty(b, dtype=torch.int32, device=meta),
    )


# --------------------------------------------------------------------------------------------
# Causal conv
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_conv_matches_loop(width, use_bias, activation):
    x, w, bias, _ = conv_inputs(w=width).values()
    bias = bias if use_bias else None
    out = m2.causal_conv1d_fn(x, w, bias, activation=activation)
    ref = naive_conv(x, w, bias, activation=activation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_conv_initial_and_final_states():
    x, w, bias, init = conv_inputs().values()
    out, final = m2.causal_conv1d_fn(
        x, w, bias, initial_states=init, return_final_states=True, activation="silu"
    )
    ref = naive_conv(x, w, bias, initial_states=init, activation="silu")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, x[:, :, -3:], rtol=0, atol=0)
    # seqlen shorter than width - 1: the final state still contains part of the initial state
    out_s, final_s = m2.causal_conv1d_fn(
        x[:, :, :2], w, bias, initial_states=init, return_final_states=True
    )
    torch.testing.assert_close(final_s, torch.cat([init[:, :, -1:], x[:, :, :2]], -1))
    torch.testing.assert_close(
        out_s, naive_conv(x[:, :, :2], w, bias, initial_states=init), rtol=1e-12, atol=1e-12
    )
    # final_states_out is filled in place and returned
    buf = torch.empty(2, 6, 3, dtype=F64)
    _, ret = m2.causal_conv1d_fn(x, w, bias, return_final_states=True, final_states_out=buf)
    assert ret is buf
    torch.testing.assert_close(buf, x[:, :, -3:])


def test_conv_channel_last_and_fp32():
    x, w, bias, init = conv_inputs(l=33).values()
    x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)  # (b, d, l) view with stride(1) == 1
    assert x_cl.stride(1) == 1
    out = m2.causal_conv1d_fn(x_cl.float(), w.float(), bias.float(), activation="silu")
    assert out.dtype == torch.float32
    ref = naive_conv(x, w, bias, activation="silu")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out_bf = m2.causal_conv1d_fn(x.bfloat16(), w.float(), bias.float(), activation="silu")
    assert out_bf.dtype == torch.bfloat16


def test_conv_seq_idx_no_leakage():
    x, w, bias, init = conv_inputs(l=21).values()
    lengths = [[1, 6, 2, 12], [9, 12]]
    seq_idx = packed(lengths)
    seq_idx[0, -4:] = -1  # padding tokens
    for use_init in (False, True):
        kw = dict(initial_states=init if use_init else None, activation="silu")
        out = m2.causal_conv1d_fn(x, w, bias, seq_idx=seq_idx, **kw)
        ref = naive_conv(x, w, bias, seq_idx=seq_idx, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert (out[0, :, -4:] == 0).all()
    # packed output equals convolving every sequence separately
    out = m2.causal_conv1d_fn(x, w, bias, seq_idx=seq_idx, activation="silu")
    start = 0
    for n in lengths[1]:
        part = m2.causal_conv1d_fn(x[1:, :, start : start + n], w, bias, activation="silu")
        torch.testing.assert_close(out[1:, :, start : start + n], part, rtol=1e-12, atol=1e-12)
        start += n


def test_conv_gradients_match_loop():
    x, w, bias, init = conv_inputs(l=15).values()
    seq_idx = packed([[4, 11]]).expand(2, -1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in dict(x=x, w=w, b=bias, i=init).items()}
    wt = torch.randn(x.shape, dtype=F64)
    for sid in (None, seq_idx):

        def run(fn):
            L = leaves
            return lambda: (
                fn(L["x"], L["w"], L["b"], seq_idx=sid, initial_states=L["i"], activation="silu")
                * wt
            ).sum()

        g1 = grads_of(run(m2.causal_conv1d_fn), leaves)
        g2 = grads_of(run(naive_conv), leaves)
        for k in leaves:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-12, atol=1e-12, msg=k)


def test_conv_rejects_unknown_activation():
    x, w, bias, _ = conv_inputs().values()
    with pytest.raises(NotImplementedError):
        m2.causal_conv1d_fn(x, w, bias, activation="relu")


def test_conv_update_steps_equal_full_conv():
    x, w, bias, init = conv_inputs(l=9).values()
    full = m2.causal_conv1d_fn(x, w, bias, initial_states=init, activation="silu")
    state = torch.cat([torch.zeros(2, 6, 1, dtype=F64), init], -1)  # state_len = width
    steps = [m2.causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(4)]
    multi = m2.causal_conv1d_update(x[:, :, 4:], state, w, bias, "silu")  # several tokens
    got = torch.cat([torch.stack(steps, -1), multi], -1)
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, x[:, :, -4:])
    # slot indirection; slot -1 is padding (zero output, no state write)
    pool = torch.randn(4, 6, 4, dtype=F64)
    pool_before = pool.clone()
    out = m2.causal_conv1d_update(
        x[:, :, 0], pool, w, bias, "silu", conv_state_indices=torch.tensor([2, -1])
    )
    expected = m2.causal_conv1d_update(x[:1, :, 0], pool_before[2:3].clone(), w, bias, "silu")
    torch.testing.assert_close(out[:1], expected)
    assert (out[1] == 0).all()
    torch.testing.assert_close(pool[2, :, :3], pool_before[2, :, 1:])
    torch.testing.assert_close(pool[2, :, 3], x[0, :, 0])
    for s in (0, 1, 3):
        torch.testing.assert_close(pool[s], pool_before[s], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Decode step of the SSM
# --------------------------------------------------------------------------------------------


def test_selective_state_update_steps_equal_scan():
    t = scan_inputs(l=6, g=2)
    dt_raw = torch.randn_like(t["dt"])
    y, final = m2.mamba_chunk_scan_combined(
        t["x"],
        dt_raw,
        t["A"],
        t["B"],
        t["C"],
        4,
        D=t["D_h"],
        z=t["z"],
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        initial_states=t["init"],
        return_final_states=True,
    )
    h, p, n = 4, 3, 5
    A3 = t["A"].view(h, 1, 1).expand(h, p, n)  # Megatron passes stride-0 expanded tensors
    D2 = t["D_h"].view(h, 1).expand(h, p)
    bias2 = t["dt_bias"].view(h, 1).expand(h, p)
    state = t["init"].clone()
    outs = []
    for s in range(3):  # mamba_ssm layout: one token, (batch, nheads, headdim)
        outs.append(
            m2.selective_state_update(
                state,
                t["x"][:, s],
                dt_raw[:, s, :, None].expand(-1, -1, p),
                A3,
                t["B"][:, s],
                t["C"][:, s],
                D=D2,
                z=t["z"][:, s],
                dt_bias=bias2,
                dt_softplus=True,
            )
        )
    # Megatron layout: (batch, seqlen, nheads, headdim) with intermediate states
    inter = torch.zeros(2, 3, h, p, n, dtype=F64)
    outs.append(
        m2.selective_state_update(
            state,
            t["x"][:, 3:],
            dt_raw[:, 3:, :, None].expand(-1, -1, -1, p),
            A3,
            t["B"][:, 3:],
            t["C"][:, 3:],
            D=D2,
            z=t["z"][:, 3:],
            dt_bias=bias2,
            dt_softplus=True,
            intermediate_ssm_states=inter,
        )
    )
    got = torch.cat([torch.stack(outs[:3], 1), outs[3]], 1)
    torch.testing.assert_close(got, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inter[:, -1], final, rtol=1e-10, atol=1e-10)
    _, mid = m2.mamba_chunk_scan_combined(
        t["x"][:, :4],
        dt_raw[:, :4],
        t["A"],
        t["B"][:, :4],
        t["C"][:, :4],
        4,
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        initial_states=t["init"],
        return_final_states=True,
    )
    torch.testing.assert_close(inter[:, 0], mid, rtol=1e-10, atol=1e-10)


def test_selective_state_update_batch_indices():
    t = scan_inputs(l=1, g=1)
    h, p, n = 4, 3, 5
    A3 = t["A"].view(h, 1, 1).expand(h, p, n)
    pool = torch.randn(5, h, p, n, dtype=F64)
    before = pool.clone()
    dt = t["dt"][:, 0, :, None].expand(-1, -1, p)
    out = m2.selective_state_update(
        pool,
        t["x"][:, 0],
        dt,
        A3,
        t["B"][:, 0],
        t["C"][:, 0],
        state_batch_indices=torch.tensor([3, -1], dtype=torch.int32),
    )
    own = before[3:4].clone()
    expected = m2.selective_state_update(
        own, t["x"][:1, 0], dt[:1], A3, t["B"][:1, 0], t["C"][:1, 0]
    )
    torch.testing.assert_close(out[:1], expected)
    assert (out[1] == 0).all()
    torch.testing.assert_close(pool[3], own[0])
    for s in (0, 1, 2, 4):
        torch.testing.assert_close(pool[s], before[s], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Gated RMSNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 4, 8])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("use_z", [True, False])
def test_rmsnorm_gated_formula(group_size, norm_before_gate, use_z):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=gen, dtype=F64)
    z = torch.randn(3, 5, 16, generator=gen, dtype=F64) if use_z else None
    norm = m2.RMSNormGated(
        16, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate, dtype=F64
    )
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen, dtype=F64))
    out = norm(x, z)
    ref = naive_rmsnorm(x, norm.weight.detach(), z, 1e-5, group_size, norm_before_gate)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    fn_out = m2.rms_norm_gated(
        x,
        norm.weight,
        None,
        z=z,
        eps=1e-5,
        group_size=group_size,
        norm_before_gate=norm_before_gate,
    )
    torch.testing.assert_close(fn_out, out, rtol=0, atol=0)


@pytest.mark.parametrize("pieces", [2, 4])
def test_rmsnorm_gated_group_shared_across_pieces(pieces):
    """A group split into ``pieces`` modules (as over tensor-parallel ranks): each normalises
    its slice with the group's total sum of squares (``group_sum``), and the slices together
    give the unsplit norm, values and gradients."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 16, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(3, 5, 16, generator=gen, dtype=F64)
    weight = torch.randn(16, generator=gen, dtype=F64)
    whole = m2.rms_norm_gated(x, weight, None, z, 1e-5, None, False)
    width = 16 // pieces
    xs, zs = x.split(width, dim=-1), z.split(width, dim=-1)
    sums = [(xi * F.silu(zi)).square().sum(-1, keepdim=True) for xi, zi in zip(xs, zs)]
    parts = []
    for i in range(pieces):
        norm = m2.RMSNormGated(width, eps=1e-5, group_size=width, norm_before_gate=False)
        norm.to(F64)
        with torch.no_grad():
            norm.weight.copy_(weight[i * width : (i + 1) * width])
        others = sum(s for j, s in enumerate(sums) if j != i)
        norm.share_group_across_ranks(lambda ss, o=others: ss + o.view(ss.shape), 16)
        parts.append(norm(xs[i], zs[i]))
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-12, atol=1e-12)
    grad = torch.randn(whole.shape, generator=gen, dtype=F64)
    (ref,) = torch.autograd.grad(whole, x, grad)
    (got,) = torch.autograd.grad(torch.cat(parts, -1), x, grad)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="only group"):
        m2.RMSNormGated(8, group_size=4).share_group_across_ranks(lambda s: s, 16)


def test_rmsnorm_gated_module_interface():
    norm = m2.RMSNormGated(12, eps=1e-5, group_size=6, norm_before_gate=False, dtype=torch.bfloat16)
    assert list(norm.state_dict()) == ["weight"]
    assert norm.bias is None and norm.weight.dtype == torch.bfloat16
    assert torch.equal(norm.weight, torch.ones(12, dtype=torch.bfloat16))
    x = torch.randn(4, 2, 12, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(4, 2, 12, dtype=torch.bfloat16, requires_grad=True)
    out = norm(x, z)
    assert out.dtype == torch.bfloat16
    ref = naive_rmsnorm(x.detach(), norm.weight.detach(), z.detach(), 1e-5, 6, False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert x.grad is not None and z.grad is not None and norm.weight.grad is not None

    class Sub(m2.RMSNormGated):  # Megatron subclasses the norm (ExtendedRMSNorm)
        pass

    sub = Sub(12, eps=1e-5, group_size=6, norm_before_gate=False, dtype=torch.bfloat16)
    sub.load_state_dict(norm.state_dict())


# --------------------------------------------------------------------------------------------
# Fused split path
# --------------------------------------------------------------------------------------------


def split_by_hand(
    t,
    D,
    h,
    p,
    g,
    n,
    chunk,
    seq_idx=None,
    init=None,
    rmsnorm=False,
    norm_before_gate=True,
    outproj=False,
    d_nonssm=0,
    eps=1e-6,
):
    """The fused path composed from the individual ops (and the plain formula for swiglu)."""
    dim = h * p
    zx0, z, xBC, dt = torch.split(t["zxbcdt"], [2 * d_nonssm, dim, dim + 2 * g * n, h], -1)
    xBC = m2.causal_conv1d_fn(
        xBC.transpose(1, 2), t["conv_w"], t["conv_b"], seq_idx=seq_idx, activation="silu"
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, g * n, g * n], -1)
    b, l = x.shape[:2]
    y, final = m2.mamba_chunk_scan_combined(
        x.reshape(b, l, h, p),
        dt,
        t["A"],
        B.reshape(b, l, g, n),
        C.reshape(b, l, g, n),
        chunk,
        D=D,
        z=None if rmsnorm else z.reshape(b, l, h, p),
        dt_bias=t["dt_bias"],
        dt_softplus=True,
        initial_states=init,
        seq_idx=seq_idx,
        return_final_states=True,
    )
    y = y.reshape(b, l, dim)
    if rmsnorm:
        y = m2.rms_norm_gated(
            y,
            t["norm_w"],
            None,
            z=z,
            eps=eps,
            group_size=dim // g,
            norm_before_gate=norm_before_gate,
        )
    if d_nonssm:
        a, c = zx0.chunk(2, -1)
        y = torch.cat([a * torch.sigmoid(a) * c, y], -1)
    if outproj:
        y = F.linear(y, t["out_w"], t["out_b"])
    return y, final


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # Megatron training call: z gate inside the scan, D per head, headdim given
        dict(d_hp=True, rmsnorm=True, norm_before_gate=False, g=1),
        dict(rmsnorm=True, norm_before_gate=True, outproj=True),
        dict(d_nonssm=3, outproj=True),
        dict(d_nonssm=2, rmsnorm=True, norm_before_gate=False, packed=True, init=True),
        dict(packed=True, init=True, d_hp=True),
    ],
)
def test_split_path_equals_composition(case):
    h, p, n = 4, 3, 5
    g = case.get("g", 2)
    d_nonssm = case.get("d_nonssm", 0)
    t = split_inputs(h=h, p=p, g=g, n=n, d_nonssm=d_nonssm)
    D = t["D_hp"] if case.get("d_hp") else t["D_h"]
    seq_idx = packed([[5, 9, 5]]).expand(2, -1) if case.get("packed") else None
    init = t["init"] if case.get("init") else None
    rmsnorm = case.get("rmsnorm", False)
    nbg = case.get("norm_before_gate", True)
    outproj = case.get("outproj", False)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items() if k not in ("D_h", "D_hp")}
    leaves["D"] = D.clone().requires_grad_(True)

    def fused():
        L = leaves
        return m2.mamba_split_conv1d_scan_combined(
            L["zxbcdt"],
            L["conv_w"],
            L["conv_b"],
            L["dt_bias"],
            L["A"],
            L["D"],
            8,
            initial_states=L["init"] if init is not None else None,
            seq_idx=seq_idx,
            return_final_states=True,
            activation="silu",
            rmsnorm_weight=L["norm_w"] if rmsnorm else None,
            rmsnorm_eps=1e-6,
            outproj_weight=L["out_w"] if outproj else None,
            outproj_bias=L["out_b"] if outproj else None,
            headdim=None if L["D"].dim() == 2 else p,
            ngroups=g,
            norm_before_gate=nbg,
        )

    def by_hand():
        L = leaves
        return split_by_hand(
            L,
            L["D"],
            h,
            p,
            g,
            n,
            8,
            seq_idx=seq_idx,
            init=L["init"] if init is not None else None,
            rmsnorm=rmsnorm,
            norm_before_gate=nbg,
            outproj=outproj,
            d_nonssm=d_nonssm,
        )

    out, final = fused()
    ref, ref_final = by_hand()
    expected_width = 7 if outproj else d_nonssm + h * p
    assert out.shape == (2, 19, expected_width)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)
    wt = torch.randn(out.shape, dtype=F64)
    g1 = grads_of(lambda: (fused()[0] * wt).sum() + fused()[1].sum(), leaves)
    g2 = grads_of(lambda: (by_hand()[0] * wt).sum() + by_hand()[1].sum(), leaves)
    for k in leaves:
        if g2[k] is None:  # input not used by this configuration
            assert g1[k] is None, k
            continue
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-10, msg=k)


def test_split_path_matches_naive_end_to_end():
    """Megatron's rmsnorm=True recipe (scan with z gate, then norm without z) vs naive ops."""
    h, p, g, n = 4, 3, 2, 5
    t = split_inputs(h=h, p=p, g=g, n=n)
    out = m2.mamba_split_conv1d_scan_combined(
        t["zxbcdt"],
        t["conv_w"],
        t["conv_b"],
        t["dt_bias"],
        t["A"],
        t["D_h"],
        4,
        headdim=p,
        ngroups=g,
        norm_before_gate=False,
    )
    normed = m2.RMSNormGated(
        h * p, eps=1e-5, group_size=h * p // g, norm_before_gate=False, dtype=F64
    )
    with torch.no_grad():
        normed.weight.copy_(t["norm_w"])
    got = normed(out)

    dim = h * p
    z, xBC, dt = torch.split(t["zxbcdt"], [dim, dim + 2 * g * n, h], -1)
    xBC = naive_conv(xBC.transpose(1, 2), t["conv_w"], t["conv_b"], activation="silu")
    x, B, C = torch.split(xBC.transpose(1, 2), [dim, g * n, g * n], -1)
    b, l = x.shape[:2]
    y, _ = naive_scan(
        x.reshape(b, l, h, p),
        dt,
        t["A"],
        B.reshape(b, l, g, n),
        C.reshape(b, l, g, n),
        D=t["D_h"],
        z=z.reshape(b, l, h, p),
        dt_bias=t["dt_bias"],
        dt_softplus=True,
    )
    ref = naive_rmsnorm(y.reshape(b, l, dim), t["norm_w"], None, 1e-5, dim // g)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Dispatch: what MambaMixer learns about `state_dtype` from the ops' signatures
# --------------------------------------------------------------------------------------------


def _fake_module(name, **attrs):
    mod = type(sys)(name)
    mod.__dict__.update(attrs)
    return mod


@pytest.mark.parametrize("kernels", ["none", "with_state_dtype", "without_state_dtype"])
def test_dispatch_advertises_state_dtype_like_the_installed_kernels(monkeypatch, kernels):
    """MambaMixer sets MAMBA_HAS_STATE_DTYPE from inspect.signature of the ops it imports.
    Through the dispatch it must come out as with the kernels imported directly; otherwise, with
    kernels lacking `state_dtype`, every forward whose params_dtype differs from the activation
    dtype fails instead of keeping states in the input dtype (upstream behaviour)."""
    dispatch_file = Path(m2.__file__).with_name("mamba2_dispatch.py")
    if not dispatch_file.is_file():
        pytest.skip("mamba2_dispatch.py is not next to mamba2_torch.py")
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    if kernels == "none":
        monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import fails
    else:

        def scan(x, dt, A, B, C, chunk_size, state_dtype=None):
            raise AssertionError("not called")

        def scan_old(x, dt, A, B, C, chunk_size):
            raise AssertionError("not called")

        fn = scan if kernels == "with_state_dtype" else scan_old
        parts = {
            "mamba_ssm": {},
            "mamba_ssm.ops": {},
            "mamba_ssm.ops.triton": {},
            "mamba_ssm.ops.triton.layernorm_gated": {"rmsnorm_fn": lambda *a, **k: None},
            "mamba_ssm.ops.triton.ssd_combined": {
                "mamba_chunk_scan_combined": fn,
                "mamba_split_conv1d_scan_combined": fn,
            },
        }
        for name, attrs in parts.items():
            monkeypatch.setitem(sys.modules, name, _fake_module(name, **attrs))
    spec = importlib.util.spec_from_file_location("_mamba2_dispatch_under_test", dispatch_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    advertised = all(
        "state_dtype" in inspect.signature(f).parameters
        for f in (mod.mamba_chunk_scan_combined, mod.mamba_split_conv1d_scan_combined)
    )
    assert mod.HAVE_MAMBA_SSM_KERNELS == (kernels != "none")
    assert advertised == (kernels != "without_state_dtype")
    # the PyTorch path still runs on CPU tensors with either signature
    b, l, h, p, g, n = 1, 6, 2, 4, 1, 3
    x = torch.randn(b, l, h, p)
    dt = torch.rand(b, l, h)
    A = -torch.rand(h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    y = mod.mamba_chunk_scan_combined(x, dt, A, B, C, 4)
    torch.testing.assert_close(y, m2.mamba_chunk_scan_combined(x, dt, A, B, C, 4))
