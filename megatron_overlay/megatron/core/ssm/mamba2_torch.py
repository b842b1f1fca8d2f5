# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Pure-PyTorch implementations of the Mamba-2 operations used by ``MambaMixer``.

Upstream ``MambaMixer`` takes its training-time kernels from ``mamba_ssm`` (Triton) and
``causal_conv1d`` (CUDA). Neither runs on CPU, and both are optional installs on GPU machines.
This module provides drop-in replacements written with plain ``torch`` operations, so that the
mixer can train (forward and backward, through ordinary autograd) anywhere PyTorch runs:

* :func:`causal_conv1d_fn` - depthwise causal convolution (``causal_conv1d.causal_conv1d_fn``).
* :func:`mamba_chunk_scan_combined` - the chunked SSD scan of Mamba-2
  (``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``).
* :func:`mamba_split_conv1d_scan_combined` - the fused "memory-efficient" path
  (``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined``).
* :class:`RMSNormGated` / :func:`rms_norm_gated` - gated group RMSNorm
  (``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` / ``rmsnorm_fn``).
* :func:`causal_conv1d_update` and :func:`selective_state_update` - single-step (decode)
  recurrences (``causal_conv1d.causal_conv1d_update`` and
  ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``).

Signatures, argument names, tensor layouts and return conventions follow the originals, so the
functions can be swapped in at the mixer's import site. All arithmetic is done in float32
(float64 when the main input is float64, which the unit tests use for tight comparisons) and
results are cast back to the input dtype (autocast is disabled around the matmuls, so an
enclosing ``torch.autocast`` region does not lower their precision). Nothing here reads tensor
values on the host
(no ``.item()``, no data-dependent Python control flow), so the functions are free of host
synchronisation.

Semantics that matter for packed sequences (``seq_idx``) mirror the reference kernels:

* conv: a tap only sees inputs with the same ``seq_idx`` as the output position; tokens with a
  negative ``seq_idx`` (padding) produce 0; ``initial_states`` belong to the sequence of the
  first token.
* scan: the state is reset whenever ``seq_idx`` changes; ``initial_states`` belong to the
  sequence with ``seq_idx == 0``. ``seq_idx`` is expected to be non-decreasing along the
  sequence, as produced by sequence packing.

The SSD scan is evaluated chunk-wise: an exact quadratic (attention-like) form inside each chunk
plus a state-passing step between chunks, which is computed with a numerically stable segment-sum
in log space (no cumulative-sum differences over the whole sequence, no loop over tokens).
"""

import contextlib
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "rms_norm_gated",
    "rmsnorm_fn",
    "RMSNormGated",
    "selective_state_update",
]

_ACTIVATIONS = (None, "silu", "swish")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Internal arithmetic dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    """Context that disables autocast on ``device``, so matmuls inside stay in fp32/fp64."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_activation(activation: Optional[str]) -> None:
    if activation not in _ACTIVATIONS:
        raise NotImplementedError("activation must be None, silu, or swish")


# --------------------------------------------------------------------------------------------
# Causal depthwise convolution
# --------------------------------------------------------------------------------------------


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Depthwise causal 1D convolution, a pure-PyTorch ``causal_conv1d.causal_conv1d_fn``.

    ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k])`` where
    inputs at negative positions come from ``initial_states`` (zeros if not given).

    Args:
        x: (batch, dim, seqlen). Any memory layout.
        weight: (dim, width).
        bias: (dim,) or None.
        seq_idx: (batch, seqlen) integer sequence ids for packed sequences, or None. A tap only
            contributes when its input has the same id as the output position (no leakage
            across sequence boundaries); positions with a negative id output 0.
        initial_states: (batch, dim, width - 1) inputs preceding position 0, or None. With
            ``seq_idx`` they count as part of the first token's sequence.
        return_final_states: also return the last ``width - 1`` inputs, shape
            (batch, dim, width - 1) in ``x``'s dtype (the conv state for continuing the
            sequence). Unlike the CUDA kernel this is also allowed together with ``seq_idx``.
        final_states_out: optional tensor that the final states are copied into (no gradient
            flows through the copy); it is then returned in place of a new tensor.
        activation: None, "silu" or "swish".

    Returns:
        out (batch, dim, seqlen) in ``x``'s dtype, or ``(out, final_states)``.
    """
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got shape {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"bias must be ({dim},), got {tuple(bias.shape)}")
    ct = _compute_dtype(x)

    xf = x.to(ct)
    if initial_states is not None:
        if initial_states.shape != (batch, dim, width - 1):
            raise ValueError(
                f"initial_states must be {(batch, dim, width - 1)}, "
                f"got {tuple(initial_states.shape)}"
            )
        prefix = initial_states.to(ct)
    else:
        prefix = xf.new_zeros(batch, dim, width - 1)
    xpad = torch.cat([prefix, xf], dim=-1)  # (batch, dim, width - 1 + seqlen)
    wf = weight.to(ct)

    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise ValueError(f"seq_idx must be {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
        if initial_states is not None:
            prefix_ids = seq_idx[:, :1].expand(batch, width - 1)
        else:
            prefix_ids = torch.full_like(seq_idx[:, :1], -1).expand(batch, width - 1)
        ids_pad = torch.cat([prefix_ids, seq_idx], dim=-1)

    # Explicit shift-and-add over the (small) kernel width: exact fp32 arithmetic on every
    # backend (cuDNN may otherwise pick TF32 for F.conv1d) and a natural place for the mask.
    out = None
    for k in range(width):
        term = xpad[:, :, k : k + seqlen] * wf[:, k : k + 1]
        if seq_idx is not None:
            same = (ids_pad[:, k : k + seqlen] == seq_idx).unsqueeze(1)
            term = torch.where(same, term, torch.zeros((), dtype=ct, device=x.device))
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(ct).unsqueeze(-1)
    if seq_idx is not None:
        out = out.masked_fill((seq_idx < 0).unsqueeze(1), 0.0)
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)

    if not return_final_states:
        return out
    final_states = xpad[:, :, xpad.shape[-1] - (width - 1) :].to(x.dtype)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def _scatter_rows_sync_free(dest: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> None:
    """``dest[indices[i]] = rows[i]`` for ``indices[i] >= 0``; negative indices are skipped.

    Implemented without boolean indexing (which would synchronise with the host on CUDA).
    Valid indices are assumed to be distinct.
    """
    num_slots = dest.shape[0]
    idx = indices.to(torch.long)
    valid = idx >= 0
    source_row = torch.where(valid, torch.arange(idx.numel(), device=idx.device), -1)
    slot_src = torch.full((num_slots,), -1, dtype=torch.long, device=idx.device)
    slot_src.scatter_reduce_(0, idx.clamp(min=0), source_row, reduce="amax")
    has_new = (slot_src >= 0).view(num_slots, *([1] * (dest.dim() - 1)))
    gathered = rows.to(dest.dtype)[slot_src.clamp(min=0)]
    dest.copy_(torch.where(has_new, gathered, dest))


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode step of the causal conv, a pure-PyTorch ``causal_conv1d.causal_conv1d_update``.

    The new input(s) are appended to the rolling ``conv_state`` (updated in place) and the
    convolution output at the new position(s) is returned.

    Args:
        x: (batch, dim) or (batch, dim, seqlen) new inputs.
        conv_state: (batch, dim, state_len) with ``state_len >= width - 1`` (or
            (num_slots, dim, state_len) with ``conv_state_indices``); updated in place.
        weight: (dim, width).
        bias: (dim,) or None.
        activation: None, "silu" or "swish".
        cache_seqlens: circular-buffer mode of the CUDA op; not supported here.
        conv_state_indices: (batch,) integer slot of each batch row in ``conv_state``;
            rows with a negative slot are padding: their output is 0 and no state is written.

    Returns:
        Output with the shape and dtype of ``x``.
    """
    _check_activation(activation)
    if cache_seqlens is not None:
        raise NotImplementedError("cache_seqlens (circular conv state) is not supported")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state length {state_len} < width - 1 = {width - 1}")
    ct = _compute_dtype(x)

    if conv_state_indices is not None:
        slots = conv_state_indices.to(torch.long)
        state = conv_state[slots.clamp(min=0)]
    else:
        state = conv_state
    if state.shape != (batch, dim, state_len):
        raise ValueError(f"conv_state rows must be {(batch, dim, state_len)}")

    x_all = torch.cat([state.to(ct), x.to(ct)], dim=-1)  # (batch, dim, state_len + seqlen)
    window = x_all[:, :, x_all.shape[-1] - (width - 1) - seqlen :]
    wf = weight.to(ct)
    out = None
    for k in range(width):
        term = window[:, :, k : k + seqlen] * wf[:, k : k + 1]
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(ct).unsqueeze(-1)
    if activation is not None:
        out = F.silu(out)

    new_state = x_all[:, :, x_all.shape[-1] - state_len :]
    if conv_state_indices is not None:
        out = out.masked_fill((slots < 0).view(batch, 1, 1), 0.0)
        _scatter_rows_sync_free(conv_state, slots, new_state)
    else:
        conv_state.copy_(new_state)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


# --------------------------------------------------------------------------------------------
# Chunked SSD scan
# --------------------------------------------------------------------------------------------


def _process_dt(
    dt: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    dt_limit: Sequence[float],
    ct: torch.dtype,
) -> torch.Tensor:
    """dt -> clamp(softplus(dt + dt_bias)) in the compute dtype, as the kernels do."""
    dtf = dt.to(ct)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(ct)
    if dt_softplus:
        # threshold 20 matches the kernels: softplus(v) for v <= 20, v itself above.
        dtf = F.softplus(dtf)
    # The kernels always clamp (the default (0, inf) is a no-op for softplus outputs).
    return torch.clamp(dtf, min=float(dt_limit[0]), max=float(dt_limit[1]))


def _segsum_stable(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``out[..., e, f] = sum_{m=f+1}^{e} a[..., m]`` for e >= f.

    Entries above the diagonal are ``-inf`` so that ``exp`` maps them to 0. Computed by a
    cumulative sum over a masked square matrix instead of differences of a running cumsum,
    which would lose precision once the running sum grows large.
    """
    n = a.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=a.device)
    rep = a.unsqueeze(-1).expand(*a.shape, n)  # [..., e, f] = a[..., e]
    rep = rep.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)
    out = torch.cumsum(rep, dim=-2)
    return out.masked_fill(~torch.tril(ones, diagonal=0), float("-inf"))


def _ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
):
    """Core SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``, ``y_t = h_t C_t``.

    Inputs are already in the compute dtype and dt is already processed (bias, softplus,
    clamp). Shapes: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n),
    initial_states (b, h, p, n) or None, seq_idx (b, l) or None.

    Returns ``(y, final_states, aux)``: y (b, l, h, p) without the D skip or z gate,
    final_states (b, h, p, n), and chunk-level tensors used for varlen states.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    k = h // g
    # The result does not depend on the chunk length; a chunk longer than the sequence only
    # wastes work, so cap it.
    Q = max(1, min(int(chunk_size), l))
    nc = math.ceil(l / Q)
    pad = nc * Q - l
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))  # dt = 0: padded steps neither decay nor add
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)

    xc = x.reshape(b, nc, Q, g, k, p)
    Bc = B.reshape(b, nc, Q, g, n)
    Cc = C.reshape(b, nc, Q, g, n)
    dtc = dt.reshape(b, nc, Q, h).permute(0, 3, 1, 2)  # (b, h, nc, Q)
    dA_cs = torch.cumsum(dtc * A.view(1, h, 1, 1), dim=-1)  # (b, h, nc, Q)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    if seq_idx is not None:
        sid = seq_idx.reshape(b, nc, Q)
        sid_end = sid[:, :, -1]  # sequence that owns the state leaving each chunk
        # sequence that owns the state entering each chunk (the initial state counts as id 0)
        sid_in = torch.cat([torch.zeros_like(sid_end[:, :1]), sid_end[:, :-1]], dim=1)

    # 1) Intra-chunk (diagonal blocks): y_i += sum_{j<=i} C_i.B_j exp(cs_i - cs_j) dt_j x_j.
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    if seq_idx is not None:
        keep = causal & (sid.unsqueeze(-1) == sid.unsqueeze(-2)).unsqueeze(1)  # (b,1,nc,Q,Q)
    else:
        keep = causal
    seg = dA_cs.unsqueeze(-1) - dA_cs.unsqueeze(-2)  # (b, h, nc, Q(i), Q(j))
    decay_ij = torch.exp(seg.masked_fill(~keep, float("-inf")))
    CB = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # (b, g, nc, Q, Q)
    scores = decay_ij.view(b, g, k, nc, Q, Q) * CB.unsqueeze(2) * dtc.view(b, g, k, nc, 1, Q)
    y = torch.einsum("bgkcij,bcjgkp->bcigkp", scores, xc)

    # 2) State contributed by each chunk, taken to the chunk's end.
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs) * dtc  # (b, h, nc, Q)
    if seq_idx is not None:
        owns = (sid == sid_end.unsqueeze(-1)).unsqueeze(1)
        decay_to_end = torch.where(owns, decay_to_end, zero)
    chunk_states = torch.einsum(
        "bcjgn,bgkcj,bcjgkp->bcgkpn", Bc, decay_to_end.view(b, g, k, nc, Q), xc
    )  # (b, nc, g, k, p, n)

    # 3) State passing between chunks: S_c = exp(T_c) [same seq] S_{c-1} + chunk_states_c,
    #    solved in closed form with a stable segment sum over chunk totals T_c.
    if initial_states is not None:
        init = initial_states.reshape(b, 1, g, k, p, n)
    else:
        init = x.new_zeros(b, 1, g, k, p, n)
    states_ext = torch.cat([init, chunk_states], dim=1)  # (b, nc + 1, g, k, p, n)
    log_w = _segsum_stable(F.pad(dA_cs[..., -1], (1, 0)))  # (b, h, nc + 1, nc + 1)
    if seq_idx is not None:
        resets = (sid_end != sid_in).to(torch.int32)
        epoch = torch.cumsum(F.pad(resets, (1, 0)), dim=-1)  # (b, nc + 1)
        linked = (epoch.unsqueeze(-1) == epoch.unsqueeze(-2)).unsqueeze(1)
        log_w = log_w.masked_fill(~linked, float("-inf"))
    w = torch.exp(log_w).view(b, g, k, nc + 1, nc + 1)
    passed = torch.einsum("bgkef,bfgkpn->begkpn", w, states_ext)
    prev_states = passed[:, :nc]  # state entering each chunk
    final_states = passed[:, nc].reshape(b, h, p, n)

    # 4) Inter-chunk (off-diagonal) output: y_i += exp(cs_i) C_i . S_prev.
    decay_in = torch.exp(dA_cs)
    if seq_idx is not None:
        from_prev = (sid == sid_in.unsqueeze(-1)).unsqueeze(1)
        decay_in = torch.where(from_prev, decay_in, zero)
    y = y + torch.einsum(
        "bcign,bcgkpn,bgkci->bcigkp", Cc, prev_states, decay_in.view(b, g, k, nc, Q)
    )
    y = y.reshape(b, nc * Q, h, p)[:, :l]
    aux = (xc, Bc, dtc, dA_cs, prev_states)
    return y, final_states, aux


def _varlen_states(aux, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """State after the last token of each sequence of a packed batch (batch must be 1).

    Mirrors ``mamba_ssm``'s ``chunk_state_varlen``: tokens of the sequence inside the last
    chunk are accumulated explicitly, the state entering that chunk is added only if the
    sequence started before the chunk.
    """
    xc, Bc, dtc, dA_cs, prev_states = aux
    _, nc, Q, g, k, p = xc.shape
    n = Bc.shape[-1]
    h = g * k
    cu = cu_seqlens.to(device=xc.device, dtype=torch.long)
    starts, ends = cu[:-1], cu[1:] - 1  # ends: index of the last token
    S = starts.numel()
    c_i = torch.div(ends, Q, rounding_mode="floor")
    i_i = ends - c_i * Q
    dA_c = dA_cs[0][:, c_i]  # (h, S, Q)
    dA_end = dA_c.gather(-1, i_i.view(1, S, 1).expand(h, S, 1))  # (h, S, 1)
    j = torch.arange(Q, device=xc.device)
    inside = ((c_i.unsqueeze(-1) * Q + j) >= starts.unsqueeze(-1)) & (j <= i_i.unsqueeze(-1))
    wts = torch.exp(torch.clamp(dA_end - dA_c, max=0.0)) * dtc[0][:, c_i]
    wts = torch.where(inside.unsqueeze(0), wts, torch.zeros((), dtype=wts.dtype, device=wts.device))
    states = torch.einsum("sqgn,gksq,sqgkp->sgkpn", Bc[0][c_i], wts.view(g, k, S, Q), xc[0][c_i])
    carry = torch.where(
        (starts < c_i * Q).unsqueeze(0),
        torch.exp(dA_end.squeeze(-1)),
        torch.zeros_like(dA_end[..., 0]),
    )  # (h, S)
    states = states + prev_states[0][c_i] * carry.t().reshape(S, g, k, 1, 1)
    return states.reshape(S, h, p, n)


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype: Optional[torch.dtype] = None,
):
    """Mamba-2 SSD scan, a pure-PyTorch ``mamba_ssm`` ``mamba_chunk_scan_combined``.

    Per head ``h`` (group ``g = h // (nheads // ngroups)``) and time step ``t``::

        dt_t  = clamp(softplus?(dt[t, h] + dt_bias[h]), *dt_limit)
        S_t   = exp(dt_t * A[h]) * S_{t-1} + dt_t * x[t, h, :, None] * B[t, g, None, :]
        y_t   = S_t @ C[t, g] + D[h] * x[t, h]
        out_t = y_t * silu(z[t, h])          (if z is given)

    evaluated chunk by chunk (exact quadratic form inside a chunk, state passing between
    chunks). ``seqlen`` need not be a multiple of ``chunk_size``.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads).
        A: (nheads,).
        B, C: (batch, seqlen, ngroups, dstate).
        chunk_size: chunk length of the blocked algorithm (does not change the result).
        D: (nheads,) or (nheads, headdim), or None.
        z: (batch, seqlen, nheads, headdim) gate, or None.
        dt_bias: (nheads,) or None.
        initial_states: (batch, nheads, headdim, dstate) state before the first token.
        seq_idx: (batch, seqlen) integer ids of packed sequences (non-decreasing); the state is
            reset at every change of id. ``initial_states`` apply to the sequence with id 0.
        cu_seqlens: (num_sequences + 1,) cumulative lengths; only used with
            ``return_varlen_states`` (batch must be 1).
        dt_softplus: apply softplus to ``dt + dt_bias``.
        dt_limit: (min, max) clamp of the processed dt.
        return_final_states: also return the state after the last token, (batch, nheads,
            headdim, dstate), float32 (float64 for float64 inputs), like the kernel.
        return_varlen_states: also return the state after the last token of each sequence in
            ``cu_seqlens``, (num_sequences, nheads, headdim, dstate).
        state_dtype: accepted for interface compatibility with newer ``mamba_ssm`` (dtype of
            the inter-chunk states there); states are always kept in the compute dtype here,
            which is at least as precise.

    Returns:
        out (batch, seqlen, nheads, headdim) in ``x``'s dtype; with ``return_final_states`` /
        ``return_varlen_states`` a tuple ``(out, [final_states], [varlen_states])``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise ValueError(f"B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2:]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be ({nheads},), got {tuple(A.shape)}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be ({nheads},) or {(nheads, headdim)}, got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be ({nheads},), got {tuple(dt_bias.shape)}")
    if initial_states is not None and initial_states.shape != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"initial_states must be {(batch, nheads, headdim, dstate)}, "
            f"got {tuple(initial_states.shape)}"
        )
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    if return_varlen_states:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens must be provided if return_varlen_states is True")
        if batch != 1:
            raise ValueError("return_varlen_states requires batch == 1")
    if state_dtype is not None and not isinstance(state_dtype, torch.dtype):
        raise TypeError(f"state_dtype must be a torch.dtype or None, got {state_dtype!r}")
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if seqlen == 0:
        raise ValueError("seqlen must be positive")

    ct = _compute_dtype(x)
    xf = x.to(ct)
    dtf = _process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    init = initial_states.to(ct) if initial_states is not None else None
    with _autocast_off(x.device):
        y, final_states, aux = _ssd_chunked(
            xf, dtf, A.to(ct), B.to(ct), C.to(ct), chunk_size, init, seq_idx
        )
    if D is not None:
        Df = D.to(ct)
        y = y + xf * (Df.view(1, 1, nheads, 1) if Df.dim() == 1 else Df.view(1, 1, nheads, headdim))
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(x.dtype)

    extras = []
    if return_final_states:
        extras.append(final_states)
    if return_varlen_states:
        with _autocast_off(x.device):
            extras.append(_varlen_states(aux, cu_seqlens))
    return (out, *extras) if extras else out


# --------------------------------------------------------------------------------------------
# Gated RMSNorm
# --------------------------------------------------------------------------------------------


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
    group_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    full_group_size: Optional[int] = None,
) -> torch.Tensor:
    """Group-wise gated RMSNorm (float32 math), a pure-PyTorch ``mamba_ssm`` ``rmsnorm_fn``.

    With ``z``: ``norm(x) * silu(z)`` if ``norm_before_gate`` else ``norm(x * silu(z))``, where
    ``norm`` normalises each contiguous group of ``group_size`` features of the last dimension
    by its root mean square, then scales by ``weight`` (and adds ``bias``).

    Args:
        x: (..., hidden).
        weight: (hidden,).
        bias: (hidden,) or None.
        z: gate with x's shape, or None.
        eps: added to the mean square.
        group_size: features per normalisation group; None means one group (hidden).
        norm_before_gate: see above.
        group_sum: for a group split over several processes (``x`` holds ``group_size`` of
            its ``full_group_size`` features): sums a ``(..., 1)`` per-process sum of squares
            over the processes sharing the group (e.g. an autograd-aware all-reduce). The
            mean square is then that total divided by ``full_group_size``.
        full_group_size: features of the whole group (with ``group_sum``).

    Returns:
        Tensor with x's shape and dtype.
    """
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else int(group_size)
    if hidden % group_size != 0:
        raise ValueError(f"hidden size {hidden} is not divisible by group_size {group_size}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        # Like the Triton kernel (which flattens both to rows of `hidden`), accept a gate of
        # another shape with the same rows, e.g. (b, d) for x of shape (b, 1, d).
        if z.numel() != x.numel() or z.shape[-1] != hidden:
            raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
        z = z.reshape(x.shape)
    ct = _compute_dtype(x)
    xf = x.to(ct)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(ct))
    xg = xf.reshape(*x.shape[:-1], hidden // group_size, group_size)
    if group_sum is None:
        rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    else:
        if full_group_size is None or hidden != group_size:
            raise ValueError("group_sum needs full_group_size and one local group (group_size)")
        total = group_sum(xg.square().sum(dim=-1, keepdim=True))
        rstd = torch.rsqrt(total / full_group_size + eps)
    out = (xg * rstd).reshape(x.shape) * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(ct))
    return out.to(x.dtype)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Alias of :func:`rms_norm_gated` with ``mamba_ssm``'s ``rmsnorm_fn`` signature."""
    return rms_norm_gated(x, weight, bias, z, eps, group_size, norm_before_gate)


class RMSNormGated(torch.nn.Module):
    """Gated group RMSNorm module, a pure-PyTorch ``mamba_ssm`` ``layernorm_gated.RMSNorm``.

    Has the same constructor, a single parameter ``weight`` (``bias`` is registered as None),
    so state dicts are interchangeable with the Triton module.

    Args:
        hidden_size: size of the normalised (last) dimension.
        eps: epsilon added to the mean square.
        group_size: features per normalisation group (None: one group).
        norm_before_gate: ``norm(x) * silu(z)`` if True, else ``norm(x * silu(z))``.
        device, dtype: factory kwargs for ``weight``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.group_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.full_group_size: Optional[int] = None
        self.reset_parameters()

    def share_group_across_ranks(
        self, group_sum: Callable[[torch.Tensor], torch.Tensor], full_group_size: int
    ) -> None:
        """Normalise one group of ``full_group_size`` features, of which this module holds
        ``group_size``: the sum of squares is completed by ``group_sum`` (see
        :func:`rms_norm_gated`)."""
        if self.group_size is not None and self.group_size != self.weight.shape[0]:
            raise ValueError("a group shared across ranks must be the module's only group")
        self.group_sum = group_sum
        self.full_group_size = int(full_group_size)

    def reset_parameters(self) -> None:
        """Initialise ``weight`` to ones."""
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x`` (optionally gated by ``z``)."""
        return rms_norm_gated(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
            group_sum=self.group_sum,
            full_group_size=self.full_group_size,
        )

    def extra_repr(self) -> str:
        """Width, epsilon, group size and gate order in the module printout."""
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )


# --------------------------------------------------------------------------------------------
# Fused split -> conv -> scan -> (norm) -> (out_proj) path
# --------------------------------------------------------------------------------------------


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: Optional[torch.Tensor],
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    dt_limit: Sequence[float] = (0.0, float("inf")),
    return_final_states: bool = False,
    activation: Optional[str] = "silu",
    rmsnorm_weight: Optional[torch.Tensor] = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Optional[torch.Tensor] = None,
    outproj_bias: Optional[torch.Tensor] = None,
    headdim: Optional[int] = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    state_dtype: Optional[torch.dtype] = None,
):
    """Fused Mamba-2 mixer core, a pure-PyTorch ``mamba_split_conv1d_scan_combined``.

    Splits ``zxbcdt`` into ``[zx0 (2*d_nonssm), z (dim), xBC (dim + 2*ngroups*dstate),
    dt (nheads)]``, runs the causal conv (+activation) on xBC, the SSD scan with
    ``dt_softplus=True``, then either gates with ``silu(z)`` (no ``rmsnorm_weight``) or applies
    the gated group RMSNorm (group size ``dim // ngroups``), prepends ``silu(zx0[:half]) *
    zx0[half:]`` when ``d_nonssm > 0``, and finally the optional output projection.

    Unlike the Triton version this does not recompute activations in backward; autograd keeps
    the intermediate tensors.

    Args:
        zxbcdt: (batch, seqlen, 2*d_nonssm + 2*dim + 2*ngroups*dstate + nheads).
        conv1d_weight: (dim + 2*ngroups*dstate, width).
        conv1d_bias: (dim + 2*ngroups*dstate,) or None.
        dt_bias: (nheads,).
        A: (nheads,).
        D: (nheads,) or (nheads, headdim).
        chunk_size: scan chunk length.
        initial_states: (batch, nheads, headdim, dstate) or None.
        seq_idx: (batch, seqlen) packed-sequence ids, used by both the conv and the scan.
        dt_limit: (min, max) clamp of dt after softplus.
        return_final_states: also return the final SSM state.
        activation: conv activation, None, "silu" or "swish".
        rmsnorm_weight: (dim,) weight of the gated RMSNorm, or None.
        rmsnorm_eps: RMSNorm epsilon.
        outproj_weight: (out_dim, d_nonssm + dim) or None.
        outproj_bias: (out_dim,) or None.
        headdim: required when D is 1-D.
        ngroups: number of B/C groups.
        norm_before_gate: RMSNorm(x) * silu(z) if True, else RMSNorm(x * silu(z)).
        state_dtype: accepted for interface compatibility (see mamba_chunk_scan_combined).

    Returns:
        out (batch, seqlen, out_dim or d_nonssm + dim) in zxbcdt's dtype, or
        ``(out, final_states)``.
    """
    _check_activation(activation)
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim must be given when D is 1-D")
        (nheads,) = D.shape
    else:
        nheads, headdim = D.shape
    batch, seqlen, total = zxbcdt.shape
    dim = nheads * headdim
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    if conv1d_weight.shape[0] != dim + 2 * ngroups * dstate or dstate <= 0:
        raise ValueError(f"conv1d_weight rows {conv1d_weight.shape[0]} do not match dim/ngroups")
    d_nonssm = (total - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or total != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt last dim {total} does not match the head/group layout")
    if dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be ({nheads},), got {tuple(dt_bias.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be ({nheads},), got {tuple(A.shape)}")
    if rmsnorm_weight is not None and rmsnorm_weight.shape != (dim,):
        raise ValueError(f"rmsnorm_weight must be ({dim},), got {tuple(rmsnorm_weight.shape)}")
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("outproj_bias given without outproj_weight")

    zx0, z, xBC, dt = torch.split(
        zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1
    )
    xBC = causal_conv1d_fn(
        xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    z4 = z.reshape(batch, seqlen, nheads, headdim)

    scan = mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z4 if rmsnorm_weight is None else None,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
        state_dtype=state_dtype,
    )
    y, final_states = scan if return_final_states else (scan, None)
    out = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        out = rms_norm_gated(
            out,
            rmsnorm_weight,
            None,
            z=z,
            eps=rmsnorm_eps,
            group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    if d_nonssm > 0:
        gate, up = zx0.chunk(2, dim=-1)
        ct = _compute_dtype(zx0)
        swiglu = (F.silu(gate.to(ct)) * up.to(ct)).to(out.dtype)
        out = torch.cat([swiglu, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out


# --------------------------------------------------------------------------------------------
# Decode step
# --------------------------------------------------------------------------------------------


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    intermediate_ssm_states: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token-by-token SSM recurrence, a pure-PyTorch ``selective_state_update``.

    Accepts the layouts of ``mamba_ssm.ops.triton.selective_state_update`` and of Megatron's
    ``megatron.core.ssm.ops.mamba_ssm.selective_state_update`` (optional sequence dimension
    for speculative tokens, ``intermediate_ssm_states``). ``state`` is updated in place; the
    recurrence itself runs in float32 (float64 for float64 inputs) and the state is written
    back once at the end.

    Args:
        state: (batch, dim, dstate) or (batch, nheads, dim, dstate) (rows addressed by
            ``state_batch_indices`` when given).
        x: with heads: (batch, nheads, dim) or (batch, seqlen, nheads, dim); without heads:
            (batch, dim) or (batch, seqlen, dim).
        dt: matches x (per-element dt; tied values across dim are allowed).
        A: (dim, dstate) or (nheads, dim, dstate).
        B, C: with heads: (batch, ngroups, dstate) or (batch, seqlen, ngroups, dstate);
            without: (batch, dstate) or (batch, seqlen, dstate).
        D: (dim,) or (nheads, dim), or None.
        z: matches x, or None.
        dt_bias: (dim,) or (nheads, dim), or None.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        state_batch_indices: (batch,) state row of each batch entry; negative = padding
            (output 0, state untouched).
        intermediate_ssm_states: optional (slots, seqlen, nheads, dim, dstate) buffer (or
            without the head dim) receiving the state after every step.

    Returns:
        out with x's shape and dtype.
    """
    has_heads = state.dim() == 4
    x_in_shape, x_dtype = x.shape, x.dtype
    if has_heads:
        if x.dim() == 3:
            x, dt, B, C = (t.unsqueeze(1) for t in (x, dt, B, C))
            z = z.unsqueeze(1) if z is not None else None
    else:
        if x.dim() == 2:
            x, dt, B, C = (t.unsqueeze(1) for t in (x, dt, B, C))
            z = z.unsqueeze(1) if z is not None else None
        # add the head dimension: (batch, seqlen, 1, ...)
        x, dt, B, C = (t.unsqueeze(2) for t in (x, dt, B, C))
        z = z.unsqueeze(2) if z is not None else None
        A = A.unsqueeze(0)
        D = D.unsqueeze(0) if D is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
        if intermediate_ssm_states is not None:
            intermediate_ssm_states = intermediate_ssm_states.unsqueeze(2)
    batch, seqlen, nheads, dim = x.shape
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    ct = _compute_dtype(x)
    if D is not None and D.dim() == 1:
        D = D.unsqueeze(-1).expand(nheads, dim)
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias.unsqueeze(-1).expand(nheads, dim)

    state4 = state if has_heads else state.unsqueeze(1)
    if state_batch_indices is not None:
        slots = state_batch_indices.to(torch.long)
        h_state = state4[slots.clamp(min=0)].to(ct)
    else:
        h_state = state4.to(ct)

    rep = nheads // ngroups
    Bh = B.to(ct).repeat_interleave(rep, dim=2)  # (batch, seqlen, nheads, dstate)
    Ch = C.to(ct).repeat_interleave(rep, dim=2)
    dtp = dt.to(ct)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(ct)
    if dt_softplus:
        dtp = F.softplus(dtp)
    Af = A.to(ct)
    xf = x.to(ct)
    outs = []
    for s in range(seqlen):
        dA = torch.exp(Af * dtp[:, s].unsqueeze(-1))  # (batch, nheads, dim, dstate)
        h_state = h_state * dA + (dtp[:, s] * xf[:, s]).unsqueeze(-1) * Bh[:, s].unsqueeze(-2)
        if intermediate_ssm_states is not None:
            step = h_state.unsqueeze(1)
            if state_batch_indices is not None:
                _scatter_rows_sync_free(intermediate_ssm_states[:, s : s + 1], slots, step)
            else:
                intermediate_ssm_states[:, s : s + 1].copy_(step)
        with _autocast_off(x.device):
            out = torch.einsum("bhdn,bhn->bhd", h_state, Ch[:, s])
        if D is not None:
            out = out + xf[:, s] * D.to(ct)
        if z is not None:
            out = out * F.silu(z[:, s].to(ct))
        outs.append(out)
    out = torch.stack(outs, dim=1)  # (batch, seqlen, nheads, dim)

    if state_batch_indices is not None:
        out = out.masked_fill((slots < 0).view(batch, 1, 1, 1), 0.0)
        _scatter_rows_sync_free(state4, slots, h_state)
    else:
        state4.copy_(h_state)
    return out.to(x_dtype).reshape(x_in_shape)
