# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Naive references for the Mamba-2 operations, written from the equations, for tests.

Used by the CPU unit tests of ``megatron/core/ssm/mamba2_torch.py`` and by GPU checks that
compare both those ops and the ``mamba_ssm`` / ``causal_conv1d`` kernels against these before
calling either wrong. The scan is a plain loop
over time, the convolution a sum over each output's window of inputs, in the dtype of the inputs
(the callers pass float64), with no chunking, no log-space tricks and no code shared with the
ops under test; autograd through them gives the reference gradients (tests check those against
finite differences).

Equations (per batch row; head ``i`` reads B/C group ``i // (nheads // ngroups)``):

* SSD recurrence (Mamba-2)::

      dt_t = clamp(softplus(dt_t + dt_bias), lo, hi)      (softplus/bias only if requested)
      h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T      (h: headdim x dstate per head)
      y_t  = h_t C_t + D * x_t ;  out_t = y_t * silu(z_t)     (D per head or per channel)

  ``h_0`` is ``initial_states`` (zeros if absent). With ``seq_idx`` (packed sequences), the
  state restarts from zero at every token whose id differs from the previous token's; the
  initial state belongs to the sequence with id 0.
* Causal depthwise convolution of width ``W``::

      out[d, t] = act(bias[d] + sum_k weight[d, k] * u[d, t - (W - 1) + k])

  where ``u`` is the input, preceded by ``initial_states`` (``W - 1`` columns; zeros if
  absent). With ``seq_idx`` a tap counts only if its input has the same id as position ``t``
  (the initial states count as the first token's sequence) and tokens with a negative id
  (padding) output 0. The final states are the last ``W - 1`` columns of ``u``.
* Gated RMSNorm over groups of ``group_size`` channels::

      g = silu(z);  v = x * g (if not norm_before_gate) else x
      out = v / sqrt(mean_group(v^2) + eps) * weight  (* g if norm_before_gate)
"""

import math

import torch

__all__ = ["naive_conv", "naive_rmsnorm", "naive_scan", "naive_split_conv1d_scan", "silu"]


def silu(v):
    """v * sigmoid(v)."""
    return v * torch.sigmoid(v)


def softplus(v):
    """log(1 + exp(v)); equal to v above 20, where exp would only add rounding."""
    return torch.where(v > 20.0, v, torch.log(1.0 + torch.exp(torch.clamp(v, max=20.0))))


def naive_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, math.inf),
    initial_states=None,
    seq_idx=None,
    return_states=False,
):
    """SSD recurrence token by token.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads).
        A: (nheads,).
        B, C: (batch, seqlen, ngroups, dstate).
        D: None, (nheads,) or (nheads, headdim).
        z: None or like x (output gate silu(z)).
        dt_bias: None or (nheads,).
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (lo, hi) clamp of the processed dt.
        initial_states: None or (batch, nheads, headdim, dstate).
        seq_idx: None or (batch, seqlen) integer ids of packed sequences.
        return_states: also return the state after every token, (batch, seqlen, nheads,
            headdim, dstate).

    Returns:
        ``(y, final_state)`` or ``(y, final_state, states)``.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    group = [i // (nheads // ngroups) for i in range(nheads)]  # B/C group of each head
    delta = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        delta = softplus(delta)
    delta = torch.clamp(delta, min=dt_limit[0], max=dt_limit[1])
    if seq_idx is not None:  # keep[b, t] = 0 where a new sequence starts (id 0 continues h_0)
        previous = torch.cat([torch.zeros_like(seq_idx[:, :1]), seq_idx[:, :-1]], dim=1)
        keep = (seq_idx == previous).to(x.dtype)

    if initial_states is None:
        h = torch.zeros(batch, nheads, headdim, dstate, dtype=x.dtype, device=x.device)
    else:
        h = initial_states.to(x.dtype)
    # Per-token views (unbind: one backward node, not one full-size gradient per token).
    xs, deltas = x.unbind(1), delta.unbind(1)
    Bs, Cs = B[:, :, group].unbind(1), C[:, :, group].unbind(1)  # (batch, nheads, dstate)
    zs = z.unbind(1) if z is not None else None
    ys, states = [], []
    for t in range(seqlen):
        if seq_idx is not None:
            h = h * keep[:, t].view(batch, 1, 1, 1)
        d = deltas[t].view(batch, nheads, 1, 1)
        decay = torch.exp(d * A.view(1, nheads, 1, 1))
        h = decay * h + d * xs[t].unsqueeze(-1) * Bs[t].unsqueeze(-2)
        y = (h * Cs[t].unsqueeze(-2)).sum(-1)  # (batch, nheads, headdim)
        if D is not None:
            y = y + (D.view(1, nheads, 1) if D.dim() == 1 else D.unsqueeze(0)) * xs[t]
        if z is not None:
            y = y * silu(zs[t])
        ys.append(y)
        if return_states:
            states.append(h)
    out = torch.stack(ys, dim=1)
    if return_states:
        return out, h, torch.stack(states, dim=1)
    return out, h


def naive_conv(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    activation=None,
    return_final_states=False,
):
    """Causal depthwise convolution from its definition: each output is its window of inputs
    (a strided view, no shifted copies) times the weights.

    Args:
        x: (batch, dim, seqlen).
        weight: (dim, width).
        bias: None or (dim,).
        seq_idx: None or (batch, seqlen) integer sequence ids (negative: padding).
        initial_states: None or (batch, dim, width - 1), the inputs before position 0.
        activation: None, "silu" or "swish".
        return_final_states: also return the last width - 1 inputs, (batch, dim, width - 1).

    Returns:
        out (batch, dim, seqlen), or ``(out, final_states)``.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, silu or swish, got {activation!r}")
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_states is None:
        prefix = torch.zeros(batch, dim, width - 1, dtype=x.dtype, device=x.device)
    else:
        prefix = initial_states.to(x.dtype)
    u = torch.cat([prefix, x], dim=-1)  # u[..., j] is input position j - (width - 1)
    if seq_idx is not None:
        if initial_states is None:  # zero padding: its taps add 0 whatever their id
            prefix_ids = torch.full_like(seq_idx[:, :1], -1).expand(batch, width - 1)
        else:
            prefix_ids = seq_idx[:, :1].expand(batch, width - 1)
        ids = torch.cat([prefix_ids, seq_idx], dim=-1)
    # windows[b, d, t, k] = input position t - (width - 1) + k: the taps of output t
    windows = u.unfold(-1, width, 1)  # (batch, dim, seqlen, width)
    if seq_idx is not None:
        same = ids.unfold(-1, width, 1) == seq_idx.unsqueeze(-1)  # (batch, seqlen, width)
        windows = windows * same.unsqueeze(1).to(x.dtype)
    out = (windows * weight.view(1, dim, 1, width)).sum(-1)
    if bias is not None:
        out = out + bias.view(1, dim, 1)
    if activation is not None:
        out = silu(out)
    if seq_idx is not None:
        out = out * (seq_idx >= 0).to(x.dtype).unsqueeze(1)
    if return_final_states:
        return out, u[:, :, u.shape[-1] - (width - 1) :]
    return out


def naive_rmsnorm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Gated group RMSNorm in float64 (returns float64)."""
    x = x.double()
    gate = None if z is None else silu(z.double())
    if gate is not None and not norm_before_gate:
        x = x * gate
    size = group_size or x.shape[-1]
    parts = []
    for start in range(0, x.shape[-1], size):
        part = x[..., start : start + size]
        parts.append(part / torch.sqrt((part * part).mean(-1, keepdim=True) + eps))
    out = torch.cat(parts, dim=-1) * weight.double()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out


def naive_split_conv1d_scan(
    zxbcdt,
    conv_weight,
    conv_bias,
    dt_bias,
    A,
    D,
    headdim,
    ngroups,
    initial_states=None,
    seq_idx=None,
    dt_limit=(0.0, math.inf),
    rmsnorm_weight=None,
    rmsnorm_eps=1e-6,
    norm_before_gate=True,
    outproj_weight=None,
    outproj_bias=None,
):
    """Mamba-2 mixer core, composed from the references above.

    ``zxbcdt`` (batch, seqlen, 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads) splits
    into ``[zx0, z, xBC, dt]``; ``xBC`` goes through the causal conv + SiLU, then splits into
    ``x, B, C`` for the scan (dt: softplus(dt + dt_bias), clamped); ``y`` is gated by silu(z),
    or normed by the gated group RMSNorm (groups of dim // ngroups) when ``rmsnorm_weight`` is
    given; ``silu(zx0[:half]) * zx0[half:]`` is prepended when ``d_nonssm > 0``; then the output
    projection. Returns ``(out, final_state)``.
    """
    nheads = A.shape[0]
    dim = nheads * headdim
    batch, seqlen, total = zxbcdt.shape
    dstate = (conv_weight.shape[0] - dim) // (2 * ngroups)
    d_nonssm = (total - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    zx0 = zxbcdt[..., : 2 * d_nonssm]
    z = zxbcdt[..., 2 * d_nonssm : 2 * d_nonssm + dim]
    xBC = zxbcdt[..., 2 * d_nonssm + dim : total - nheads]
    dt = zxbcdt[..., total - nheads :]
    xBC = naive_conv(
        xBC.transpose(1, 2), conv_weight, conv_bias, seq_idx=seq_idx, activation="silu"
    ).transpose(1, 2)
    x = xBC[..., :dim].reshape(batch, seqlen, nheads, headdim)
    B = xBC[..., dim : dim + ngroups * dstate].reshape(batch, seqlen, ngroups, dstate)
    C = xBC[..., dim + ngroups * dstate :].reshape(batch, seqlen, ngroups, dstate)
    y, final = naive_scan(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=None if rmsnorm_weight is not None else z.reshape(batch, seqlen, nheads, headdim),
        dt_bias=dt_bias,
        dt_softplus=True,
        dt_limit=dt_limit,
        initial_states=initial_states,
        seq_idx=seq_idx,
    )
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = naive_rmsnorm(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate).to(
            y.dtype
        )
    if d_nonssm > 0:
        y = torch.cat([silu(zx0[..., :d_nonssm]) * zx0[..., d_nonssm:], y], dim=-1)
    if outproj_weight is not None:
        y = y @ outproj_weight.t()
        if outproj_bias is not None:
            y = y + outproj_bias
    return y, final
