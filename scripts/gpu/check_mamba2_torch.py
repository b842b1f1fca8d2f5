#!/usr/bin/env python3
# Copyright (c) 2025, falcon-mcore contributors. All rights reserved.

"""Compare the pure-PyTorch Mamba-2 ops and the mamba_ssm / causal_conv1d kernels with a naive
reference.

Run on a CUDA machine that has ``mamba_ssm`` (Triton kernels) and ``causal_conv1d`` installed::

    python scripts/gpu/check_mamba2_torch.py --out mamba2_torch_vs_kernels.json

For every op in ``megatron_overlay/megatron/core/ssm/mamba2_torch.py`` (causal conv, conv
update, chunked scan incl. seq_idx / initial and final states / varlen states, the fused split
path in Megatron's training configuration and with norm + out_proj, gated RMSNorm, decode state
update) and for float32 and bfloat16, it runs the kernel, our torch op and the naive reference
of ``megatron_overlay/tests/unit_tests/ssm/mamba2_naive.py`` (a token-by-token recurrence and a
position-by-position convolution written from the equations, run in float64 on the same rounded
inputs; its gradients are checked against finite differences here first and in the CPU tests)
on identical inputs. It compares forward outputs, final states and the gradients of all
differentiable inputs (of a fixed random projection of the outputs) and writes a JSON report.

Error metric: ``rel = max|a - ref| / max|ref|`` against the naive reference, for the kernel
(``rel_kernel_vs_naive``) and for our op (``rel_torch_vs_naive``); ``rel_torch_vs_kernel`` is
reported too. A check passes when both implementations are within the tolerance of their dtype
and kind (forward / gradient) of the reference. The kernels use TF32 tensor cores for float32
matmuls (Triton's default) and keep some intermediates in the input dtype, hence the looser
kernel tolerances; our op runs true float32 (TF32 off) and gets the tighter TORCH_TOLERANCES.
``--kernel-fp32-ieee`` sets ``TRITON_F32_DEFAULT=ieee`` so the float32 kernel runs are free of
TF32 too, and tightens the kernel's float32 tolerances accordingly. A wall-clock fwd+bwd timing
(and peak memory) of MambaMixer's training call is recorded for both implementations
(``--no-timing`` skips it).

Green or named: a failing check is a *known failure* only if it matches an entry of
KNOWN_FAILURES (which names the reason) and our op agrees with the naive reference there (so the
reference, not our op, says the kernel is wrong). The exit status is 0 only when every other
check passed, no case raised, the reference passed its finite-difference self-check and every
known-failure entry whose case ran still fails (a stale entry must be removed).

``--dry-run-cpu`` runs everything on CPU with small shapes using the torch ops as the "kernel";
it exercises this script (argument plumbing, the reference, report writing), not the kernels.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAY = REPO_ROOT / "megatron_overlay"
NAIVE_FILE = OVERLAY / "tests" / "unit_tests" / "ssm" / "mamba2_naive.py"
sys.path.insert(0, str(REPO_ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)

# rel-error tolerances (normalised by the kernel output's max magnitude)
# By default Triton runs float32 tl.dot on TF32 tensor cores (~1e-3 relative error);
# --kernel-fp32-ieee makes the kernels use full fp32 and switches to the tighter float32 row.
TOLERANCES = {"float32": {"fwd": 5e-3, "grad": 1e-2}, "bfloat16": {"fwd": 3e-2, "grad": 6e-2}}
TOLERANCES_FP32_IEEE = {"fwd": 2e-4, "grad": 1e-3}
# Our op against the reference: true fp32 matmuls (TF32 off); measured ~1e-5 at l=1000.
TORCH_TOLERANCES = {"float32": {"fwd": 1e-4, "grad": 1e-4}, "bfloat16": TOLERANCES["bfloat16"]}

# Failures of the kernels that are expected, each with its reason. One matches a failing check
# when the case and tensor match, only the kernel is off the naive reference (our op agrees with
# it) and real kernels ran; an entry that matches nothing while its case ran is stale (the
# kernel was fixed or the inputs changed): the run fails until the entry is removed.
KNOWN_FAILURES = [
    dict(
        impl="kernel",
        cases=["conv_seq_idx", "conv_seq_idx_init"],
        tensors=["grad:x", "grad:weight", "grad:bias"],
        reason="causal_conv1d (1.7.0, H100 run of 2026-11-26) backward with seq_idx: its "
        "forward agreed with our op, its gradients did not (rel 0.2-0.8 on x, weight, bias; our "
        "op matched our fp64 op there: the naive reference decides now). The inputs hold padding "
        "tokens (seq_idx -1) whose outputs the forward sets to 0; the channel-last backward in "
        "causal_conv1d's source (csrc/causal_conv1d_bwd.cu, read at v1.6.1) does not mask them, "
        "so padding gradients would leak into dx/dweight/dbias: conv_seq_idx_nopad (no padding) "
        "tests that explanation and is not expected to fail. MambaMixer's training path passes "
        "seq_idx only to the fused split kernel (split_megatron_seq_idx, which passes).",
    ),
    dict(
        impl="kernel",
        cases=["conv_init_final"],
        tensors=["grad:x"],
        reason="causal_conv1d (1.7.0, H100 run of 2026-11-26) backward with initial_states and "
        "return_final_states: dx disagrees (rel ~1.5) while dweight, dbias and dinitial_states "
        "agree, i.e. the gradient arriving through final_states reaches dx wrongly. MambaMixer's "
        "training path does not return final conv states.",
    ),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_torch_ops():
    """Import mamba2_torch from this checkout's overlay (or an already patched tree)."""
    if OVERLAY.is_dir():
        use("overlay")
    try:
        from megatron.core.ssm import mamba2_torch

        return mamba2_torch
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "mamba2_torch", OVERLAY / "megatron" / "core" / "ssm" / "mamba2_torch.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


class Ops:
    """One implementation of the op set, with mamba_ssm / causal_conv1d signatures."""

    def __init__(self, name, conv, conv_update, scan, split, rmsnorm_cls, ssu, version=None):
        self.name = name
        self.conv = conv
        self.conv_update = conv_update
        self.scan = scan
        self.split = split
        self.rmsnorm_cls = rmsnorm_cls
        self.ssu = ssu
        self.version = version


def torch_ops(m2):
    return Ops(
        "torch",
        m2.causal_conv1d_fn,
        m2.causal_conv1d_update,
        m2.mamba_chunk_scan_combined,
        m2.mamba_split_conv1d_scan_combined,
        m2.RMSNormGated,
        m2.selective_state_update,
    )


def dry_run_kernel_ops(m2):
    """--dry-run-cpu: our torch ops stand in for the kernels."""
    ops = torch_ops(m2)
    ops.name = "torch-as-kernel (dry run)"
    ops.version = {"mamba_ssm": "n/a (dry run)", "causal_conv1d": "n/a (dry run)"}
    return ops


def kernel_ops():
    """The real kernels. mamba_ssm's package __init__ imports the Mamba-1 CUDA extension
    ``selective_scan_cuda``, which Python-only builds lack; a placeholder module lets the
    package import (Mamba-1 kernels, not used here, would then fail loudly)."""
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        placeholder = types.ModuleType("selective_scan_cuda")
        placeholder.__doc__ = "placeholder inserted by check_mamba2_torch.py"
        sys.modules["selective_scan_cuda"] = placeholder
    import causal_conv1d
    import mamba_ssm
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )

    ops = Ops(
        "kernel",
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
        RMSNorm,
        selective_state_update,
    )
    ops.version = {
        "mamba_ssm": getattr(mamba_ssm, "__version__", "unknown"),
        "causal_conv1d": getattr(causal_conv1d, "__version__", "unknown"),
    }
    return ops


def load_naive():
    """The naive references (pure torch, no Megatron import), loaded from the overlay file."""
    spec = importlib.util.spec_from_file_location("mamba2_naive", NAIVE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_ops(nv):
    """The naive references behind the kernels' signatures (chunk sizes are irrelevant)."""

    def conv(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
             final_states_out=None, activation=None):  # fmt: skip
        return nv.naive_conv(
            x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
            activation=activation, return_final_states=return_final_states,
        )  # fmt: skip

    def conv_update(x, conv_state, weight, bias=None, activation=None):
        width = weight.shape[1]
        out = nv.naive_conv(
            x.unsqueeze(-1), weight, bias, initial_states=conv_state[..., -(width - 1) :],
            activation=activation,
        )  # fmt: skip
        with torch.no_grad():
            new = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
            conv_state.copy_(new[..., 1:])
        return out[..., 0]

    def scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
             return_final_states=False, return_varlen_states=False):  # fmt: skip
        y, final, states = nv.naive_scan(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
            return_states=True,
        )  # fmt: skip
        extras = [final] if return_final_states else []
        if return_varlen_states:
            extras.append(states[0, cu_seqlens[1:].long() - 1])
        return (y, *extras) if extras else y

    def split(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
              initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
              return_final_states=False, activation="silu", rmsnorm_weight=None,
              rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
              ngroups=1, norm_before_gate=True):  # fmt: skip
        assert activation in ("silu", "swish"), activation
        out, final = nv.naive_split_conv1d_scan(
            zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
            D.shape[1] if D.dim() == 2 else headdim, ngroups, initial_states=initial_states,
            seq_idx=seq_idx, dt_limit=dt_limit, rmsnorm_weight=rmsnorm_weight,
            rmsnorm_eps=rmsnorm_eps, norm_before_gate=norm_before_gate,
            outproj_weight=outproj_weight, outproj_bias=outproj_bias,
        )  # fmt: skip
        return (out, final) if return_final_states else out

    class RMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                     device=None, dtype=None):  # fmt: skip
            super().__init__()
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

        def forward(self, x, z=None):
            return nv.naive_rmsnorm(
                x, self.weight, z, self.eps, self.group_size, self.norm_before_gate
            )

    def ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
            state_batch_indices=None):  # fmt: skip
        # The reference has one dt / A per head: the case ties them over headdim (and dstate).
        for name, t, per_head in (("dt", dt, dt[..., :1]), ("A", A, A[:, :1, :1]),
                                  ("dt_bias", dt_bias, dt_bias[:, :1])):  # fmt: skip
            if not torch.equal(t, per_head.expand_as(t)):
                raise NotImplementedError(f"naive reference: {name} must be tied per head")
        rows = state[state_batch_indices.long()] if state_batch_indices is not None else state
        y, final = nv.naive_scan(
            x.unsqueeze(1), dt[:, None, :, 0], A[:, 0, 0], B.unsqueeze(1), C.unsqueeze(1),
            D=D, z=None if z is None else z.unsqueeze(1), dt_bias=dt_bias[:, 0],
            dt_softplus=dt_softplus, initial_states=rows,
        )  # fmt: skip
        with torch.no_grad():
            if state_batch_indices is not None:
                state[state_batch_indices.long()] = final.to(state.dtype)
            else:
                state.copy_(final)
        return y[:, 0]

    return Ops("naive", conv, conv_update, scan, split, RMSNorm, ssu)


def naive_selfcheck(nv):
    """The reference's gradients against central finite differences (float64, tiny sizes, CPU):
    the scan with every option and the conv with seq_idx padding and initial states."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, -1, -1]], dtype=torch.int32)
    b, l, h, p, g, n, d, w = 2, 5, 2, 2, 2, 2, 3, 4

    def scan(x, dt, A, B, C, D, z, dt_bias, init):
        return nv.naive_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                             initial_states=init, seq_idx=ids.clamp(min=0))  # fmt: skip

    def conv(x, weight, bias, init):
        return nv.naive_conv(x, weight, bias, seq_idx=ids, initial_states=init,
                             activation="silu")  # fmt: skip

    scan_in = [r(b, l, h, p), r(b, l, h) * 0.5, -torch.rand(h, generator=gen,
               dtype=torch.float64) - 0.2, r(b, l, g, n), r(b, l, g, n), r(h, p),
               r(b, l, h, p), r(h) * 0.3, r(b, h, p, n)]  # fmt: skip
    conv_in = [r(b, d, l), r(d, w), r(d), r(b, d, w - 1)]
    out = {}
    for name, fn, values in (("scan", scan, scan_in), ("conv", conv, conv_in)):
        leaves = [v.clone().requires_grad_(True) for v in values]
        out[name] = bool(torch.autograd.gradcheck(fn, leaves, raise_exception=False))
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class Shapes:
    def __init__(self, batch, seqlen, nheads, headdim, dstate, chunk_size, width=4):
        self.b, self.l, self.h, self.p, self.n = batch, seqlen, nheads, headdim, dstate
        self.chunk, self.w = chunk_size, width

    def as_dict(self):
        return dict(
            batch=self.b,
            seqlen=self.l,
            nheads=self.h,
            headdim=self.p,
            dstate=self.n,
            chunk_size=self.chunk,
            conv_width=self.w,
        )


def packed_seq_idx(b, l, device, padding_tail=0):
    """Row 0: several sequences with boundaries off the chunk grid, including a length-1 one;
    other rows: one sequence (optionally followed by ``padding_tail`` tokens with id -1)."""
    cuts = sorted({max(1, int(l * 0.3)), max(2, int(l * 0.3)) + 1, max(3, int(l * 0.75))})
    ids = torch.zeros(b, l, dtype=torch.int32)
    for i, c in enumerate(cuts):
        if c < l:
            ids[0, c:] = i + 1
    if padding_tail and b > 1:
        ids[1:, l - padding_tail :] = -1
    return ids.to(device)


def make_scan_inputs(S, g, dtype, device, gen):
    """Megatron-like magnitudes: A = -U(1, 16), dt_bias = softplus^-1(U(1e-3, 1e-1))."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    dt0 = torch.exp(
        torch.rand(S.h, generator=gen)
        * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
        + torch.log(torch.tensor(1e-3))
    )
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    t = dict(
        x=r(S.b, S.l, S.h, S.p).to(dtype),
        dt=(r(S.b, S.l, S.h) * 0.5).to(dtype),
        A=-(torch.rand(S.h, generator=gen) * 15 + 1),
        B=r(S.b, S.l, g, S.n).to(dtype),
        C=r(S.b, S.l, g, S.n).to(dtype),
        D=r(S.h),
        D_hp=r(S.h, S.p),
        z=r(S.b, S.l, S.h, S.p).to(dtype),
        dt_bias=dt_bias,
        init=(r(S.b, S.h, S.p, S.n) * 0.1),
    )
    return {k: v.to(device) for k, v in t.items()}


def clone_leaves(inputs, grad_keys, to64=False):
    """Fresh leaves for one run. Differentiable inputs are cloned (strides preserved, so
    channel-last views stay channel-last); others are passed as they are (stride-0 expanded
    tensors keep their strides); with ``to64`` floating tensors are converted to float64."""
    out = {}
    for k, v in inputs.items():
        c = v
        if to64 and c.is_floating_point():
            c = c.double()
        if k in grad_keys:
            c = c.detach().clone().requires_grad_(True)
        out[k] = c
    return out


# --------------------------------------------------------------------------------------------
# Cases: each returns (inputs, grad_keys, fn(ops, leaves) -> dict of named outputs)
# --------------------------------------------------------------------------------------------


def case_conv(S, g, dtype, device, gen, variant):
    d = S.h * S.p + 2 * g * S.n
    x_bld = torch.randn(S.b, S.l, d, generator=gen).to(dtype)
    inputs = dict(
        weight=(torch.rand(d, S.w, generator=gen) - 0.5).to(dtype),
        bias=(torch.rand(d, generator=gen) - 0.5).to(dtype),
    )
    if variant == "plain":  # channel-first contiguous, as MambaMixer's non-fused path passes
        inputs["x"] = x_bld.transpose(1, 2).contiguous()
    else:  # the CUDA kernel needs channel-last x for seq_idx / initial / final states
        inputs["x"] = x_bld.transpose(1, 2)
    if variant in ("init_final", "seq_idx_init"):
        init = torch.randn(S.b, S.w - 1, d, generator=gen).to(dtype)
        inputs["init"] = init.transpose(1, 2)  # (b, d, w-1) with stride(1) == 1
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if variant in ("seq_idx", "seq_idx_init"):
        inputs["seq_idx"] = packed_seq_idx(S.b, S.l, device, padding_tail=S.l // 10)
    if variant == "seq_idx_nopad":
        inputs["seq_idx"] = packed_seq_idx(S.b, S.l, device)
    grad_keys = ["x", "weight", "bias"] + (["init"] if "init" in inputs else [])

    def fn(ops, L):
        res = ops.conv(
            L["x"],
            L["weight"],
            L["bias"],
            seq_idx=L.get("seq_idx"),
            initial_states=L.get("init"),
            return_final_states=variant == "init_final",
            activation="silu",
        )
        if variant == "init_final":
            return {"out": res[0], "final_states": res[1]}
        return {"out": res}

    return inputs, grad_keys, fn


def case_conv_update(S, g, dtype, device, gen):
    d = S.h * S.p + 2 * g * S.n
    inputs = dict(
        x=torch.randn(S.b, d, generator=gen).to(dtype),
        state=torch.randn(S.b, d, S.w, generator=gen).to(dtype),
        weight=(torch.rand(d, S.w, generator=gen) - 0.5).to(dtype),
        bias=(torch.rand(d, generator=gen) - 0.5).to(dtype),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def fn(ops, L):
        state = L["state"].clone()
        out = ops.conv_update(L["x"], state, L["weight"], L["bias"], "silu")
        return {"out": out, "conv_state": state}

    return inputs, [], fn


def case_scan(S, g, dtype, device, gen, variant):
    inputs = make_scan_inputs(S, g, dtype, device, gen)
    grad_keys = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
    if variant == "init_final_dhp_limit":
        inputs["D"] = inputs["D_hp"]
        grad_keys.append("init")
    if variant == "seq_idx":
        inputs["seq_idx"] = packed_seq_idx(S.b, S.l, device)
        grad_keys.append("init")
    del inputs["D_hp"]

    def fn(ops, L):
        kw = dict(D=L["D"], z=L["z"], dt_bias=L["dt_bias"], dt_softplus=True)
        if variant == "init_final_dhp_limit":
            kw.update(initial_states=L["init"], return_final_states=True, dt_limit=(0.0, 0.05))
        if variant == "seq_idx":
            kw.update(initial_states=L["init"], seq_idx=L["seq_idx"], return_final_states=True)
        res = ops.scan(L["x"], L["dt"], L["A"], L["B"], L["C"], S.chunk, **kw)
        if isinstance(res, tuple):
            return {"out": res[0], "final_states": res[1]}
        return {"out": res}

    return inputs, grad_keys, fn


def case_scan_varlen(S, g, dtype, device, gen):
    """batch 1, packed sequences, per-sequence final states (forward only: the kernel's
    backward does not support return_varlen_states)."""
    S1 = Shapes(1, S.l, S.h, S.p, S.n, S.chunk, S.w)
    inputs = make_scan_inputs(S1, g, dtype, device, gen)
    del inputs["D_hp"]
    seq_idx = packed_seq_idx(1, S.l, device)
    inputs["seq_idx"] = seq_idx
    counts = torch.bincount(seq_idx[0].long().cpu())
    inputs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(
        device=device, dtype=torch.int32
    )

    def fn(ops, L):
        out, final, varlen = ops.scan(
            L["x"],
            L["dt"],
            L["A"],
            L["B"],
            L["C"],
            S.chunk,
            D=L["D"],
            z=L["z"],
            dt_bias=L["dt_bias"],
            dt_softplus=True,
            seq_idx=L["seq_idx"],
            cu_seqlens=L["cu_seqlens"],
            return_final_states=True,
            return_varlen_states=True,
        )
        return {"out": out, "final_states": final, "varlen_states": varlen}

    return inputs, [], fn


def case_split(S, g, dtype, device, gen, variant):
    dim = S.h * S.p
    conv_dim = dim + 2 * g * S.n
    base = make_scan_inputs(S, g, dtype, device, gen)
    inputs = dict(
        zxbcdt=torch.randn(S.b, S.l, 2 * dim + 2 * g * S.n + S.h, generator=gen).to(dtype),
        conv_w=(torch.rand(conv_dim, S.w, generator=gen) - 0.5).to(dtype),
        conv_b=(torch.rand(conv_dim, generator=gen) - 0.5).to(dtype),
        norm_w=(1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype),
        out_w=(torch.randn(S.h * 8, dim, generator=gen) / dim**0.5).to(dtype),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs.update(A=base["A"], dt_bias=base["dt_bias"], init=base["init"])
    grad_keys = ["zxbcdt", "conv_w", "conv_b", "dt_bias", "A", "D"]
    if variant == "megatron":
        inputs["D"] = base["D"]
        inputs["seq_idx"] = packed_seq_idx(S.b, S.l, device)
    else:  # norm + out_proj + initial/final states, D per channel
        inputs["D"] = base["D_hp"]
        grad_keys += ["norm_w", "out_w", "init"]

    def fn(ops, L):
        if variant == "megatron":
            # MambaMixer._ssm_training: no rmsnorm_weight / outproj here (norm applied after)
            out = ops.split(
                L["zxbcdt"],
                L["conv_w"],
                L["conv_b"],
                L["dt_bias"],
                L["A"],
                D=L["D"],
                chunk_size=S.chunk,
                activation="silu",
                headdim=S.p,
                ngroups=g,
                norm_before_gate=False,
                seq_idx=L["seq_idx"],
            )
            return {"out": out}
        out, final = ops.split(
            L["zxbcdt"],
            L["conv_w"],
            L["conv_b"],
            L["dt_bias"],
            L["A"],
            L["D"],
            S.chunk,
            initial_states=L["init"],
            return_final_states=True,
            activation="silu",
            rmsnorm_weight=L["norm_w"],
            rmsnorm_eps=1e-5,
            outproj_weight=L["out_w"],
            headdim=None,
            ngroups=g,
            norm_before_gate=False,
        )
        return {"out": out, "final_states": final}

    return inputs, grad_keys, fn


def case_rmsnorm(S, g, dtype, device, gen, norm_before_gate):
    dim = S.h * S.p
    inputs = dict(
        x=torch.randn(S.b * S.l, dim, generator=gen).to(dtype),
        z=torch.randn(S.b * S.l, dim, generator=gen).to(dtype),
        weight=(1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def fn(ops, L):
        norm = ops.rmsnorm_cls(
            dim,
            eps=1e-5,
            group_size=dim // g,
            norm_before_gate=norm_before_gate,
            device=L["x"].device,
            dtype=L["weight"].dtype,
        )
        # load through the state dict: checks the parameter name is interchangeable
        norm.load_state_dict({"weight": L["weight"].detach()})
        out = norm(L["x"], L["z"])
        # "_param:" entries are extra tensors whose gradients are compared
        return {"out": out, "_param:weight": norm.weight}

    return inputs, ["x", "z"], fn


def case_ssu(S, g, dtype, device, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    base = make_scan_inputs(Shapes(S.b, 1, S.h, S.p, S.n, S.chunk), g, dtype, device, gen)
    slots = torch.randperm(S.b + 2, generator=gen)[: S.b].to(torch.int32)
    inputs = dict(
        state=r(S.b + 2, S.h, S.p, S.n).to(device),
        x=base["x"][:, 0],
        dt=base["dt"][:, 0, :, None].expand(S.b, S.h, S.p),  # tied over headdim, as Megatron
        A=base["A"][:, None, None].expand(S.h, S.p, S.n),
        B=base["B"][:, 0],
        C=base["C"][:, 0],
        D=base["D"][:, None].expand(S.h, S.p),
        z=base["z"][:, 0],
        dt_bias=base["dt_bias"][:, None].expand(S.h, S.p),
        slots=slots.to(device),
    )

    def fn(ops, L):
        state = L["state"].clone()
        out = ops.ssu(
            state,
            L["x"],
            L["dt"],
            L["A"],
            L["B"],
            L["C"],
            D=L["D"],
            z=L["z"],
            dt_bias=L["dt_bias"],
            dt_softplus=True,
            state_batch_indices=L["slots"],
        )
        return {"out": out, "ssm_state": state}

    return inputs, [], fn


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan"), float("nan")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff, diff / max(scale, 1e-12)


def known_failure(case, tensor, failing, real_kernels):
    """Index of the KNOWN_FAILURES entry that explains a failing check, or None: only when real
    kernels ran, only the kernel is off the reference (our op agrees with it), and the case and
    tensor are listed."""
    if not real_kernels or failing != ["kernel"]:
        return None
    for i, entry in enumerate(KNOWN_FAILURES):
        if entry["impl"] == "kernel" and case in entry["cases"] and tensor in entry["tensors"]:
            return i
    return None


def stale_known_failures(results, real_kernels):
    """Entries whose cases ran with real kernels but matched no failing check."""
    if not real_kernels:
        return []
    ran = {r["case"] for r in results}
    matched = {r["known_failure"] for r in results if "known_failure" in r}
    return [
        i
        for i, entry in enumerate(KNOWN_FAILURES)
        if i not in matched and ran.intersection(entry["cases"])
    ]


def worst_index(a, b):
    """Index of the largest |a - b| (a list of ints), or None if the shapes differ."""
    if a.shape != b.shape or not a.numel():
        return None
    diff = (a.detach().double() - b.detach().double()).abs().nan_to_num(nan=float("inf"))
    flat = int(diff.flatten().argmax())
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)]


def evaluate(ops, inputs, grad_keys, fn, weights, to64=False):
    """Run one implementation: named outputs and the gradients of ``sum(out * weight)``
    with respect to ``grad_keys`` and to any ``_param:<name>`` tensors the case returns."""
    L = clone_leaves(inputs, grad_keys, to64=to64)
    with torch.set_grad_enabled(bool(grad_keys)):
        outs = fn(ops, L)
    params = {k[len("_param:") :]: v for k, v in outs.items() if k.startswith("_param:")}
    results = {k: v for k, v in outs.items() if not k.startswith("_")}
    if grad_keys:
        loss = sum((v.float() * weights[k]).sum() for k, v in results.items())
        wrt = [L[k] for k in grad_keys] + list(params.values())
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        for k, leaf, gval in zip(list(grad_keys) + list(params), wrt, grads):
            results["grad:" + k] = gval if gval is not None else torch.zeros_like(leaf)
    return {k: v.detach() for k, v in results.items()}


def output_weights(kernel, inputs, fn, gen, device):
    """Fixed random projection weights, shaped like the outputs (from a no-grad forward)."""
    with torch.no_grad():
        outs = fn(kernel, clone_leaves(inputs, []))
    shapes = {k: v.shape for k, v in outs.items() if not k.startswith("_")}
    return {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}


def cuda_time_ms(fn, iters=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON report to write")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ngroups", default="1,2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=1000)
    parser.add_argument("--nheads", type=int, default=24)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-timing", action="store_true", help="skip the fwd+bwd timings")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument(
        "--kernel-fp32-ieee",
        action="store_true",
        help="set TRITON_F32_DEFAULT=ieee (fresh Triton cache) so the kernels' float32 matmuls "
        "do not use TF32, and use tighter float32 tolerances",
    )
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="CPU, small shapes, torch ops on both sides (tests this script)",
    )
    args = parser.parse_args()

    tolerances = {k: dict(v) for k, v in TOLERANCES.items()}
    if args.kernel_fp32_ieee:
        # must happen before Triton compiles anything; a separate cache avoids reusing TF32
        # binaries compiled by earlier runs
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_ieee_cache_")
        tolerances["float32"] = dict(TOLERANCES_FP32_IEEE)
    m2 = load_torch_ops()
    mine = torch_ops(m2)
    nv = load_naive()
    naive = naive_ops(nv)
    real_kernels = not args.dry_run_cpu
    if args.dry_run_cpu:
        device = torch.device("cpu")
        kernel = dry_run_kernel_ops(m2)
        S = Shapes(2, 50, 4, 8, 16, 16)
    else:
        if not torch.cuda.is_available():
            sys.exit("CUDA is required (use --dry-run-cpu to exercise the script on CPU)")
        device = torch.device("cuda")
        kernel = kernel_ops()
        S = Shapes(args.batch, args.seqlen, args.nheads, args.headdim, args.dstate, args.chunk_size)
        # the torch ops must run true fp32 matmuls; record the setting in the report
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    groups = [int(g) for g in args.ngroups.split(",") if g.strip()]
    cases = [
        ("conv_plain", lambda *a: case_conv(*a, "plain")),
        ("conv_seq_idx", lambda *a: case_conv(*a, "seq_idx")),
        ("conv_seq_idx_nopad", lambda *a: case_conv(*a, "seq_idx_nopad")),
        ("conv_init_final", lambda *a: case_conv(*a, "init_final")),
        ("conv_seq_idx_init", lambda *a: case_conv(*a, "seq_idx_init")),
        ("conv_update", case_conv_update),
        ("scan_basic", lambda *a: case_scan(*a, "basic")),
        ("scan_init_final_dhp_limit", lambda *a: case_scan(*a, "init_final_dhp_limit")),
        ("scan_seq_idx", lambda *a: case_scan(*a, "seq_idx")),
        ("scan_varlen_states", case_scan_varlen),
        ("split_megatron_seq_idx", lambda *a: case_split(*a, "megatron")),
        ("split_norm_outproj_states", lambda *a: case_split(*a, "full")),
        ("rmsnorm_norm_after_gate", lambda *a: case_rmsnorm(*a, False)),
        ("rmsnorm_norm_before_gate", lambda *a: case_rmsnorm(*a, True)),
        ("selective_state_update", case_ssu),
    ]
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {name for name, _ in cases}
        if unknown:
            sys.exit(f"--cases: unknown {sorted(unknown)}; choose from {[n for n, _ in cases]}")
        cases = [c for c in cases if c[0] in wanted]

    errors, results, timings = [], [], []
    selfcheck = naive_selfcheck(nv)
    print(f"naive reference gradients vs finite differences: {selfcheck}")
    if not all(selfcheck.values()):
        errors.append(dict(case="naive_selfcheck", error=f"gradcheck failed: {selfcheck}"))

    header = (
        f"{'case':28s} {'dtype':8s} {'g':>1s} {'tensor':16s} {'t_vs_ref':>9s} {'k_vs_ref':>9s} "
        f"{'t_vs_k':>9s} {'tol_t':>6s} {'tol_k':>6s}  status"
    )
    print(header)
    print("-" * len(header))
    for dname in dtypes:
        dtype = DTYPES[dname]
        for g in groups:
            for cname, build in cases:
                gen = torch.Generator().manual_seed(args.seed)
                try:
                    inputs, grad_keys, fn = build(S, g, dtype, device, gen)
                    weights = output_weights(kernel, inputs, fn, gen, device)
                    got_k = evaluate(kernel, inputs, grad_keys, fn, weights)
                    got_t = evaluate(mine, inputs, grad_keys, fn, weights)
                    got_ref = evaluate(naive, inputs, grad_keys, fn, weights, to64=True)
                except Exception as exc:  # record and continue with the other cases
                    errors.append(
                        dict(
                            case=cname,
                            dtype=dname,
                            ngroups=g,
                            error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=6),
                        )
                    )
                    print(f"{cname:28s} {dname:8s} {g:1d} ERROR {type(exc).__name__}: {exc}")
                    continue
                for key in got_ref:
                    kind = "grad" if key.startswith("grad:") else "fwd"
                    tol_k, tol_t = tolerances[dname][kind], TORCH_TOLERANCES[dname][kind]
                    _, rel_t = rel_err(got_t[key], got_ref[key])
                    _, rel_k = rel_err(got_k[key], got_ref[key])
                    max_abs, rel_tk = rel_err(got_t[key], got_k[key])
                    failing = [
                        name
                        for name, rel, tol in (("torch", rel_t, tol_t), ("kernel", rel_k, tol_k))
                        if not rel <= tol  # nan fails
                    ]
                    entry = known_failure(cname, key, failing, real_kernels)
                    status = "known_failure" if entry is not None else "FAIL" if failing else "pass"
                    rec = dict(
                        case=cname,
                        dtype=dname,
                        ngroups=g,
                        tensor=key,
                        kind=kind,
                        rel_torch_vs_naive=rel_t,
                        rel_kernel_vs_naive=rel_k,
                        rel_torch_vs_kernel=rel_tk,
                        max_abs_torch_vs_kernel=max_abs,
                        tol_torch=tol_t,
                        tol_kernel=tol_k,
                        status=status,
                        passed=status == "pass",
                        failing=failing,
                        torch_dtype=str(got_t[key].dtype),
                        kernel_dtype=str(got_k[key].dtype),
                    )
                    for name in failing:  # where the largest error sits
                        rec[f"worst_index_{name}"] = worst_index(
                            (got_t if name == "torch" else got_k)[key], got_ref[key]
                        )
                    if entry is not None:
                        rec["known_failure"] = entry
                    results.append(rec)
                    print(
                        f"{cname:28s} {dname:8s} {g:1d} {key:16s} {rel_t:9.2e} {rel_k:9.2e} "
                        f"{rel_tk:9.2e} {tol_t:6.0e} {tol_k:6.0e}  {status}"
                    )
                del got_k, got_t, got_ref

            if not args.no_timing and device.type == "cuda":
                # fwd+bwd of MambaMixer's training call, kernel vs torch
                gen = torch.Generator().manual_seed(args.seed)
                inputs, grad_keys, fn = case_split(S, g, dtype, device, gen, "megatron")
                weights = output_weights(kernel, inputs, fn, gen, device)
                for ops in (kernel, mine):
                    try:
                        torch.cuda.reset_peak_memory_stats()
                        ms = cuda_time_ms(lambda: evaluate(ops, inputs, grad_keys, fn, weights))
                        peak = torch.cuda.max_memory_allocated() / 2**20
                        timings.append(
                            dict(
                                case="split_megatron_seq_idx fwd+bwd",
                                dtype=dname,
                                ngroups=g,
                                impl=ops.name,
                                ms=ms,
                                peak_mib=peak,
                            )
                        )
                        print(
                            f"timing split fwd+bwd {dname} g={g} {ops.name:6s}: {ms:8.2f} ms, "
                            f"peak {peak:8.1f} MiB"
                        )
                    except Exception as exc:
                        errors.append(
                            dict(
                                case="timing",
                                dtype=dname,
                                ngroups=g,
                                error=f"{ops.name}: {type(exc).__name__}: {exc}",
                            )
                        )

    matched = {r["known_failure"] for r in results if "known_failure" in r}
    for i in stale_known_failures(results, real_kernels):
        errors.append(
            dict(case="known_failures", error=f"KNOWN_FAILURES[{i}] did not fail although its "
                 f"cases ran ({KNOWN_FAILURES[i]['cases']}): remove the entry if the kernel is "
                 "fixed")  # fmt: skip
        )
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_known = sum(r["status"] == "known_failure" for r in results)
    summary = dict(
        n_checks=len(results),
        n_passed=sum(r["status"] == "pass" for r in results),
        n_failed=n_fail,
        n_known_failures=n_known,
        n_errors=len(errors),
        known_failures=[
            f"{KNOWN_FAILURES[i]['impl']}: {', '.join(KNOWN_FAILURES[i]['cases'])} "
            f"({sum(r.get('known_failure') == i for r in results)} checks)"
            for i in sorted(matched)
        ],
        failed=sorted({f"{r['case']} {r['tensor']} ({'+'.join(r['failing'])})"
                       for r in results if r["status"] == "FAIL"}),  # fmt: skip
        all_passed=n_fail == 0 and not errors and bool(results),
    )
    report = dict(
        script="scripts/gpu/check_mamba2_torch.py",
        **provenance(sys.argv),
        dry_run_cpu=args.dry_run_cpu,
        kernel_versions=kernel.version,
        settings=dict(
            shapes=S.as_dict(),
            dtypes=dtypes,
            ngroups=groups,
            seed=args.seed,
            torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            reference="naive float64 recurrence / convolution on the same rounded inputs "
            "(megatron_overlay/tests/unit_tests/ssm/mamba2_naive.py)",
            metric="rel = max|impl - reference| / max|reference|",
            kernel_fp32_ieee=args.kernel_fp32_ieee,
            kernel_tolerances=tolerances,
            torch_tolerances=TORCH_TOLERANCES,
        ),
        naive_selfcheck=selfcheck,
        known_failures_declared=KNOWN_FAILURES,
        summary=summary,
        results=results,
        errors=errors,
        timings=timings,
    )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\n{summary['n_passed']}/{summary['n_checks']} checks passed, "
        f"{n_known} known failures ({'; '.join(summary['known_failures']) or 'none'}), "
        f"{n_fail} unexpected failures, {summary['n_errors']} errors; report: {out_path}"
    )
    for e in errors:
        print(f"ERROR {e.get('case')}: {e['error']}")
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
