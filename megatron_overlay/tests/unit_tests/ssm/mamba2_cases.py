# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Inputs, cases and comparison helpers of the Mamba-2 op tests, written once.

test_mamba2_torch.py and test_mamba2_naive.py build their inputs and gradients here, and the
GPU comparison of megatron/core/ssm/mamba2_torch.py with the ``mamba_ssm`` / ``causal_conv1d``
kernels runs the cases defined here (and the finite-difference check of the references that
test_mamba2_naive.py runs). This module imports only torch: the implementations (``ops``, the
naive references of mamba2_naive.py) are passed in, so the GPU check can load it from its file.

Sections:

* sequence ids of packed sequences;
* small float64 inputs of the CPU tests and their gradient helpers;
* the finite-difference problems of the naive references;
* the kernel-comparison cases: one op set (``Ops``) per implementation, each case a function
  ``(shapes, ngroups, dtype, device, generator) -> (inputs, grad_keys, fn(ops, leaves))``,
  and the runner helpers that evaluate a case and compare two results.
"""

import math

import torch

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------------------------


def packed(lengths_per_row, pad=0):
    """seq_idx rows of consecutive sequences (ids 0, 1, ...) followed by ``pad`` ids of -1."""
    rows = []
    for lengths in lengths_per_row:
        ids = [i for i, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
        rows.append(torch.tensor(ids, dtype=torch.int32))
    return torch.stack(rows)


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


# --------------------------------------------------------------------------------------------
# Small inputs of the CPU tests
# --------------------------------------------------------------------------------------------


def scan_inputs(b=2, l=37, h=4, p=3, g=2, n=5, dtype=F64, seed=0, signed_dt=False):
    """Random scan inputs with moderate magnitudes: ``dt = U(0.05, 0.65)``,
    ``A = -U(0.1, 1.6)``, ``dt_bias = 0.5 N(0, 1)``; with ``signed_dt``, ``dt = 0.5 N(0, 1)``
    (a pre-softplus value; callers without softplus make it positive), a stronger decay
    ``A = -U(0.2, 2.2)`` and ``dt_bias = 0.3 N(0, 1)``."""
    a_span, a_min, dt_bias_scale = (2.0, 0.2, 0.3) if signed_dt else (1.5, 0.1, 0.5)
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = r(b, l, h, p)
    if signed_dt:
        dt = r(b, l, h) * 0.5
    else:
        dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * 0.6 + 0.05
    return dict(
        x=x,
        dt=dt,
        A=-(torch.rand(h, generator=gen, dtype=dtype) * a_span + a_min),
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D_h=r(h),
        D_hp=r(h, p),
        z=r(b, l, h, p),
        dt_bias=r(h) * dt_bias_scale,
        init=r(b, h, p, n),
    )


def conv_inputs(b=2, d=6, l=21, w=4, dtype=F64, seed=1):
    """Causal-conv inputs: x (b, d, l), weight (d, w), bias (d,), init (b, d, w - 1)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(x=r(b, d, l), weight=r(d, w), bias=r(d), init=r(b, d, w - 1))


def split_inputs(h=4, p=3, g=2, n=5, d_nonssm=0, b=2, l=19, w=4, seed=5, near_one_norm=False):
    """Inputs of the fused split path (float64): ``norm_w = N(0, 1)``, ``dt_bias = 0.5 N(0, 1)``
    and 7 output features; with ``near_one_norm``, ``norm_w = 1 + 0.2 N(0, 1)``,
    ``dt_bias = 0.3 N(0, 1)`` and 3 output features."""
    dt_bias_scale, out_features = (0.3, 3) if near_one_norm else (0.5, 7)
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    dim = h * p
    conv_dim = dim + 2 * g * n
    zxbcdt = r(b, l, 2 * d_nonssm + 2 * dim + 2 * g * n + h)
    conv_w = r(conv_dim, w) * 0.5
    conv_b = r(conv_dim) * 0.1
    dt_bias = r(h) * dt_bias_scale
    A = -(torch.rand(h, generator=gen, dtype=F64) + 0.2)
    D_h, D_hp = r(h), r(h, p)
    norm_w = 1 + 0.2 * r(dim) if near_one_norm else r(dim)
    return dict(
        zxbcdt=zxbcdt,
        conv_w=conv_w,
        conv_b=conv_b,
        dt_bias=dt_bias,
        A=A,
        D_h=D_h,
        D_hp=D_hp,
        norm_w=norm_w,
        out_w=r(out_features, d_nonssm + dim),
        out_b=r(out_features),
        init=r(b, h, p, n),
    )


def fresh_leaves(values):
    """Detached copies of ``values`` that require gradients."""
    return [v.detach().clone().requires_grad_(True) for v in values]


def grads_of(loss_fn, tensors):
    """Gradients of ``loss_fn()`` with respect to the dict ``tensors`` (None where unused)."""
    for v in tensors.values():
        v.grad = None
    loss_fn().backward()
    return {k: None if v.grad is None else v.grad.clone() for k, v in tensors.items()}


def reference_grads(fn_ours, fn_ref, values, seed=9):
    """Gradients of sum(out * w) for fixed random w: ours vs the reference's autograd."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for fn in (fn_ours, fn_ref):
        leaves = fresh_leaves(values)
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen.manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    return grads


# --------------------------------------------------------------------------------------------
# Finite-difference problems of the naive references
# --------------------------------------------------------------------------------------------


def naive_scan_gradcheck_problem(naive_scan, g, variant):
    """``(fn, leaves)`` for ``torch.autograd.gradcheck`` of the naive scan (float64, tiny):
    variant "plain", or "seq_idx_limit_dhp" (packed sequences, D per channel, a dt limit)."""
    t = scan_inputs(b=2, l=5, h=2, p=2, g=g, n=2, seed=3, signed_dt=True)
    seq_idx = packed([[2, 3], [5]]) if variant != "plain" else None
    D = t["D_hp"] if variant != "plain" else t["D_h"]
    # the limit clamps some dt values and leaves others (no value within eps of a bound)
    limit = (0.0, 0.6) if variant != "plain" else (0.0, math.inf)

    def fn(x, dt, A, B, C, D, z, dt_bias, init):
        return naive_scan(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, dt_limit=limit,
            initial_states=init, seq_idx=seq_idx,
        )  # fmt: skip

    inputs = [t["x"], t["dt"], t["A"], t["B"], t["C"], D, t["z"], t["dt_bias"], t["init"]]
    return fn, [v.clone().requires_grad_(True) for v in inputs]


def naive_conv_gradcheck_problem(naive_conv, variant):
    """``(fn, leaves)`` for ``torch.autograd.gradcheck`` of the naive conv (float64, tiny):
    variant "plain", "init_final" or "seq_idx_pad_init" (packed sequences with padding)."""
    t = conv_inputs(d=3, l=9)
    seq_idx = packed([[3, 4], [7]], pad=2) if variant == "seq_idx_pad_init" else None

    def fn(x, weight, bias, init):
        return naive_conv(
            x,
            weight,
            bias,
            seq_idx=seq_idx,
            initial_states=None if variant == "plain" else init,
            activation="silu",
            return_final_states=variant == "init_final",
        )

    return fn, [t[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "init")]


# --------------------------------------------------------------------------------------------
# Kernel-comparison cases
# --------------------------------------------------------------------------------------------


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
    """The pure-PyTorch ops of the module ``m2`` (megatron.core.ssm.mamba2_torch)."""
    return Ops(
        "torch",
        m2.causal_conv1d_fn,
        m2.causal_conv1d_update,
        m2.mamba_chunk_scan_combined,
        m2.mamba_split_conv1d_scan_combined,
        m2.RMSNormGated,
        m2.selective_state_update,
    )


def naive_ops(nv):
    """The naive references of the module ``nv`` (mamba2_naive) behind the kernels' signatures
    (chunk sizes are irrelevant)."""

    def conv(
        x,
        weight,
        bias=None,
        seq_idx=None,
        initial_states=None,
        return_final_states=False,
        final_states_out=None,
        activation=None,
    ):
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

    def scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=None,
        seq_idx=None,
        cu_seqlens=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
        return_varlen_states=False,
    ):
        y, final, states = nv.naive_scan(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
            return_states=True,
        )  # fmt: skip
        extras = [final] if return_final_states else []
        if return_varlen_states:
            extras.append(states[0, cu_seqlens[1:].long() - 1])
        return (y, *extras) if extras else y

    def split(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        initial_states=None,
        seq_idx=None,
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
        activation="silu",
        rmsnorm_weight=None,
        rmsnorm_eps=1e-6,
        outproj_weight=None,
        outproj_bias=None,
        headdim=None,
        ngroups=1,
        norm_before_gate=True,
    ):
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
        def __init__(
            self,
            hidden_size,
            eps=1e-5,
            group_size=None,
            norm_before_gate=True,
            device=None,
            dtype=None,
        ):
            super().__init__()
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

        def forward(self, x, z=None):
            return nv.naive_rmsnorm(
                x, self.weight, z, self.eps, self.group_size, self.norm_before_gate
            )

    def ssu(
        state,
        x,
        dt,
        A,
        B,
        C,
        D=None,
        z=None,
        dt_bias=None,
        dt_softplus=False,
        state_batch_indices=None,
    ):
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


class Shapes:
    """Sizes of the kernel-comparison cases."""

    def __init__(self, batch, seqlen, nheads, headdim, dstate, chunk_size, width=4):
        self.b, self.l, self.h, self.p, self.n = batch, seqlen, nheads, headdim, dstate
        self.chunk, self.w = chunk_size, width

    def as_dict(self):
        """The sizes by name, for a report."""
        return dict(
            batch=self.b,
            seqlen=self.l,
            nheads=self.h,
            headdim=self.p,
            dstate=self.n,
            chunk_size=self.chunk,
            conv_width=self.w,
        )


def megatron_scan_inputs(S, g, dtype, device, gen):
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


def case_conv(S, g, dtype, device, gen, variant):
    """Causal conv: plain, seq_idx (with padding), seq_idx_nopad, init_final, seq_idx_init."""
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
    """One decode step of the conv (forward only)."""
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
    """Chunked scan: basic, init_final_dhp_limit, seq_idx."""
    inputs = megatron_scan_inputs(S, g, dtype, device, gen)
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
    inputs = megatron_scan_inputs(S1, g, dtype, device, gen)
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
    """Fused split path: "megatron" (MambaMixer's training call) or "full" (norm, out_proj,
    initial and final states, D per channel)."""
    dim = S.h * S.p
    conv_dim = dim + 2 * g * S.n
    base = megatron_scan_inputs(S, g, dtype, device, gen)
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
    """Gated group RMSNorm module, built and loaded through its state dict."""
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
    """Decode step of the SSM with a state pool and slot indices (forward only)."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    base = megatron_scan_inputs(Shapes(S.b, 1, S.h, S.p, S.n, S.chunk), g, dtype, device, gen)
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


def _variant(case, *variant):
    return lambda *a: case(*a, *variant)


# name: case builder, in the order the comparison runs them
CASES = {
    "conv_plain": _variant(case_conv, "plain"),
    "conv_seq_idx": _variant(case_conv, "seq_idx"),
    "conv_seq_idx_nopad": _variant(case_conv, "seq_idx_nopad"),
    "conv_init_final": _variant(case_conv, "init_final"),
    "conv_seq_idx_init": _variant(case_conv, "seq_idx_init"),
    "conv_update": case_conv_update,
    "scan_basic": _variant(case_scan, "basic"),
    "scan_init_final_dhp_limit": _variant(case_scan, "init_final_dhp_limit"),
    "scan_seq_idx": _variant(case_scan, "seq_idx"),
    "scan_varlen_states": case_scan_varlen,
    "split_megatron_seq_idx": _variant(case_split, "megatron"),
    "split_norm_outproj_states": _variant(case_split, "full"),
    "rmsnorm_norm_after_gate": _variant(case_rmsnorm, False),
    "rmsnorm_norm_before_gate": _variant(case_rmsnorm, True),
    "selective_state_update": case_ssu,
}


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


def output_weights(ops, inputs, fn, gen, device):
    """Fixed random projection weights, shaped like the outputs (from a no-grad forward)."""
    with torch.no_grad():
        outs = fn(ops, clone_leaves(inputs, []))
    shapes = {k: v.shape for k, v in outs.items() if not k.startswith("_")}
    return {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}


def rel_err(a, b):
    """``(max|a - b|, max|a - b| / max|b|)``; inf if the shapes differ, nan if not finite."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan"), float("nan")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff, diff / max(scale, 1e-12)


def worst_index(a, b):
    """Index of the largest |a - b| (a list of ints), or None if the shapes differ."""
    if a.shape != b.shape or not a.numel():
        return None
    diff = (a.detach().double() - b.detach().double()).abs().nan_to_num(nan=float("inf"))
    flat = int(diff.flatten().argmax())
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)]
