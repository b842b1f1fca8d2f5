# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Pure PyTorch reference implementation of BitNet b1.58 quantisation.

This module is the numerical definition that every other backend (the Triton kernels in
``triton_kernels.py``) must reproduce bit for bit.  It runs on any device (CPU and CUDA) and
never synchronises with the host (no ``.item()``, no data-dependent Python control flow).

Definitions (BitNet b1.58), all scale arithmetic in IEEE fp32 unless stated:

Weight (per tensor, or per logical tensor when shards are reduced by the caller)::

    beta = max(fp32(sum|W| / numel), 1e-5)     # sum accumulated in fp64
    T    = clamp(round(fp32(W) / beta), -1, 1)  # int8 in {-1, 0, 1}
    W_q  = beta * T

``beta`` is either one scalar for the whole weight or a vector with one value per output row
(``[N]`` for ``W [N, K]``): Megatron fuses matrices that are separate in HF / BitNet models
(``linear_qkv`` = [q, k, v] per query group, gated ``linear_fc1`` = [gate; up]), and each logical
matrix needs its own beta.  In the vector case row ``n`` uses ``beta[n]`` everywhere (T, W_q,
the output epilogue); a per-segment scale is expanded to rows by the caller
(:func:`segment_sums` / :func:`weight_scale_from_abs_sum` / :func:`expand_segment_scales`).
Nothing here assumes the vector is piecewise constant.

Activation (per token, i.e. per row of the last dimension)::

    gamma = max(max|x|, 1e-5)                          # fp32
    Q     = clamp(round(fp32(fp32(x) * 127) / gamma), -128, 127)   # int8
    x_q   = Q * s,  s = fp32(gamma / 127)

Output::

    y = fp32(fp32(acc) * s_row) * beta,  acc = Q @ T^T  (exact integer product)

``round`` is round-half-to-even (``torch.round``), divisions are correctly rounded IEEE
divisions, and the order of the fp32 operations above is part of the definition so that the
Triton kernels can reproduce it exactly.

Scale computation and quantisation are separable so that a tensor-parallel layer can reduce
the scales across ranks before quantising:

* weight: :func:`weight_abs_sum` (local fp64 sum; per segment: :func:`weight_row_abs_sums`
  + :func:`segment_sums`) -> all-reduce SUM -> :func:`weight_scale_from_abs_sum` (with the
  global element count of each segment) -> (:func:`expand_segment_scales`) ->
  :func:`quantize_weight` ``(w, beta=...)``;
* activation: :func:`activation_absmax` (local per-token max) -> all-reduce MAX ->
  :func:`quantize_activation` ``(x, gamma=...)``.  ``max(., eps)`` commutes with MAX, so the
  clamped local values may be reduced directly.

Exactness of the integer product on the torch path (:func:`int_matmul_exact`): ``Q`` and
``T`` are integers with ``|Q| <= 128`` and ``|T| <= 1``; every partial sum of a dot product
of length ``K`` is an integer of magnitude ``<= 128 * K``.  Such integers, and the inputs
themselves, are exactly representable in fp32 (and in tf32 / bf16, which some BLAS settings
substitute for fp32 operands) whenever ``128 * K <= 2**24``, i.e. ``K <= 131072``; then any
summation order gives the exact result, so we use an fp32 matmul.  Above that we use fp64
(exact for ``128 * K <= 2**53``).  The result is returned as int32 (exact for ``K < 2**24``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "EPS",
    "QMAX",
    "QMIN",
    "FP32_EXACT_MAX_K",
    "weight_abs_sum",
    "weight_row_abs_sums",
    "segment_sums",
    "weight_scale_from_abs_sum",
    "expand_segment_scales",
    "weight_scale",
    "normalize_weight_scale",
    "quantize_weight",
    "dequantize_weight",
    "activation_absmax",
    "quantize_activation",
    "activation_dequant_scale",
    "dequantize_activation",
    "int_matmul_exact",
    "scaled_int_matmul",
    "bitnet_dgrad",
    "bitnet_wgrad",
]

#: Lower bound of both scales (weight beta and activation gamma), applied in fp32.
EPS: float = 1e-5
#: Activation integer range (int8).
QMAX: int = 127
QMIN: int = -128
#: Largest reduction length for which the fp32 matmul of (Q, T) is provably exact.
FP32_EXACT_MAX_K: int = (1 << 24) // 128


def weight_abs_sum(weight: torch.Tensor) -> torch.Tensor:
    """Sum of ``|W|`` accumulated in fp64 (0-dim fp64 tensor on ``weight.device``).

    This is the quantity a tensor-parallel layer all-reduces (SUM) across ranks before calling
    :func:`weight_scale_from_abs_sum` with the global element count.
    """
    return weight.detach().abs().sum(dtype=torch.float64)


def weight_row_abs_sums(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-row ``sum|W[n, :]|`` accumulated in fp64 (``[N]`` fp64 for ``W [N, ...]``).

    The input of per-segment scales (:func:`segment_sums`).
    """
    w = weight.detach()
    return w.abs().reshape(w.shape[0], -1).sum(dim=1, dtype=torch.float64)


def segment_sums(
    row_values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``out[s] = sum(row_values[segment_ids == s])`` (deterministic, no host sync).

    Args:
        row_values: ``[N]`` (e.g. the fp64 output of :func:`weight_row_abs_sums`).
        segment_ids: integer ``[N]`` with values in ``[0, num_segments)``.
        num_segments: number of segments ``S`` (small: one per logical matrix).

    Returns:
        ``[S]`` in ``row_values.dtype``.  Each segment is reduced by a fixed-order
        ``torch.sum`` (no atomics), so the result does not vary from run to run.
    """
    if row_values.dim() != 1 or segment_ids.shape != row_values.shape:
        raise ValueError(
            f"expected row_values [N] and segment_ids [N], got {tuple(row_values.shape)} and "
            f"{tuple(segment_ids.shape)}"
        )
    ids = segment_ids.to(row_values.device)
    zero = torch.zeros((), dtype=row_values.dtype, device=row_values.device)
    return torch.stack([torch.where(ids == s, row_values, zero).sum() for s in range(num_segments)])


def weight_scale_from_abs_sum(abs_sum: torch.Tensor, numel) -> torch.Tensor:
    """``beta = max(fp32(abs_sum / numel), 1e-5)`` in fp32 (no host sync).

    Args:
        abs_sum: 0-dim fp64 sum of ``|W|`` (or any shape: one sum per segment).
        numel: element count(s) the sums were taken over (the *global* counts in a
            tensor-parallel layer): an int, or a sequence of ints matching ``abs_sum``'s
            elements.

    Returns:
        fp32 tensor of ``abs_sum``'s shape.
    """
    abs_sum = abs_sum.to(torch.float64)
    if isinstance(numel, int):
        if numel <= 0:
            raise ValueError(f"numel must be positive, got {numel}")
        # Divide by a tensor, not a Python scalar: on CUDA, torch turns division by a scalar
        # into a multiplication by its reciprocal, which is not the IEEE quotient.
        denom = torch.full((), float(numel), dtype=torch.float64, device=abs_sum.device)
    else:
        counts = [int(n) for n in numel]
        if any(n <= 0 for n in counts):
            raise ValueError(f"numel must be positive, got {counts}")
        if len(counts) != abs_sum.numel():
            raise ValueError(f"{len(counts)} element counts for {abs_sum.numel()} sums")
        # One fill per segment (a host->device copy of a list would synchronise on CUDA).
        denom = torch.stack(
            [torch.full((), float(n), dtype=torch.float64, device=abs_sum.device) for n in counts]
        ).reshape(abs_sum.shape)
    mean = (abs_sum / denom).to(torch.float32)
    return mean.clamp_min(EPS)


def expand_segment_scales(beta_segments: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-row scale ``beta[n] = beta_segments[segment_ids[n]]`` (fp32 ``[N]``)."""
    ids = segment_ids.to(device=beta_segments.device, dtype=torch.long)
    return beta_segments.to(torch.float32).reshape(-1).index_select(0, ids)


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor weight scale ``beta = max(mean|W|, 1e-5)`` (0-dim fp32)."""
    return weight_scale_from_abs_sum(weight_abs_sum(weight), weight.numel())


def normalize_weight_scale(beta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Validate and normalise a weight scale for ``weight [N, ...]`` (fp32, weight's device).

    A tensor with one element becomes a 0-dim scalar (per-tensor scale); a tensor with ``N``
    elements becomes a ``[N]`` per-output-row vector.  Anything else raises ValueError.
    """
    n = beta.numel()
    if n == 1:
        return beta.reshape(()).to(device=weight.device, dtype=torch.float32)
    if weight.dim() >= 1 and n == weight.shape[0]:
        return beta.reshape(n).to(device=weight.device, dtype=torch.float32)
    raise ValueError(
        f"weight scale must have 1 element or one per output row ({tuple(weight.shape)[:1]}), "
        f"got shape {tuple(beta.shape)}"
    )


def _row_broadcast(beta: torch.Tensor, ndim: int) -> torch.Tensor:
    """``beta`` (0-dim or ``[N]``) shaped to broadcast against an ``ndim``-D ``[N, ...]``."""
    if beta.dim() == 0:
        return beta
    return beta.reshape(beta.shape[0], *([1] * (ndim - 1)))


def quantize_weight(
    weight: torch.Tensor, beta: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ternary weight quantisation.

    Args:
        weight: full-precision weight of any shape ``[N, ...]`` and floating dtype.
        beta: optional externally computed scale, e.g. the cross-rank mean of a
            tensor-parallel weight: one element (per-tensor) or ``N`` elements (one per output
            row).  Computed from ``weight`` (per tensor) if None.

    Returns:
        ``(T, beta)``: ``T`` int8 with values in {-1, 0, 1}, same shape as ``weight``;
        ``beta`` fp32, 0-dim (per-tensor) or ``[N]`` (per row).
    """
    if beta is None:
        beta = weight_scale(weight)
    beta = normalize_weight_scale(beta, weight)
    w = weight.detach().to(torch.float32)
    t = torch.round(w / _row_broadcast(beta, w.dim())).clamp_(-1.0, 1.0).to(torch.int8)
    return t, beta


def dequantize_weight(
    t: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W_q = beta * T`` computed in fp32 and cast to ``dtype`` (beta 0-dim or per row)."""
    beta = normalize_weight_scale(beta, t)
    return (t.to(torch.float32) * _row_broadcast(beta, t.dim())).to(dtype)


def activation_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-token scale ``gamma = max(max|x|, 1e-5)`` over the last dim (fp32, shape x.shape[:-1]).

    A row-parallel layer (hidden dim sharded) all-reduces the result with MAX across ranks.
    """
    return x.detach().abs().amax(dim=-1).to(torch.float32).clamp_min(EPS)


def quantize_activation(
    x: torch.Tensor, gamma: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation.

    Args:
        x: activations ``[..., K]`` (any floating dtype).
        gamma: optional externally computed per-token scale with ``x.shape[:-1]`` elements
            (e.g. a cross-rank MAX); computed from ``x`` if None.

    Returns:
        ``(Q, gamma)``: ``Q`` int8 with ``x``'s shape, ``gamma`` fp32 with shape
        ``x.shape[:-1]``.
    """
    if gamma is None:
        gamma = activation_absmax(x)
    gamma = gamma.reshape(x.shape[:-1]).to(device=x.device, dtype=torch.float32)
    v = (x.detach().to(torch.float32) * float(QMAX)) / gamma.unsqueeze(-1)
    q = torch.round(v).clamp_(float(QMIN), float(QMAX)).to(torch.int8)
    return q, gamma


def activation_dequant_scale(gamma: torch.Tensor) -> torch.Tensor:
    """``s = fp32(gamma / 127)`` (IEEE division): the per-token factor mapping Q back to x_q.

    The divisor is a tensor on purpose: torch on CUDA evaluates ``tensor / python_scalar`` as
    ``tensor * (1 / scalar)``, which can differ from the quotient in the last bit.
    """
    gamma = gamma.to(torch.float32)
    return gamma / torch.full((), float(QMAX), dtype=torch.float32, device=gamma.device)


def dequantize_activation(
    q: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x_q = Q * fp32(gamma / 127)`` computed in fp32 and cast to ``dtype``."""
    s = activation_dequant_scale(gamma).reshape(q.shape[:-1]).unsqueeze(-1)
    return (q.to(torch.float32) * s).to(dtype)


def int_matmul_exact(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact ``Q @ T^T`` for int8 ``Q [M, K]`` and ternary int8 ``T [N, K]`` -> int32 ``[M, N]``.

    Uses an fp32 matmul when ``K <= FP32_EXACT_MAX_K`` (exact, see module docstring), else
    fp64.
    """
    if q.dim() != 2 or t.dim() != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"expected Q [M, K] and T [N, K], got {tuple(q.shape)}, {tuple(t.shape)}")
    k = q.shape[1]
    if k >= (1 << 24):
        raise ValueError(f"K={k} too large for an exact int32 result")
    ftype = torch.float32 if k <= FP32_EXACT_MAX_K else torch.float64
    acc = torch.matmul(q.to(ftype), t.to(ftype).t())
    return acc.to(torch.int32)


def scaled_int_matmul(
    q: torch.Tensor,
    gamma: torch.Tensor,
    t: torch.Tensor,
    beta: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """BitNet forward product ``y = fp32(fp32(Q @ T^T) * gamma/127) * beta`` cast to out_dtype.

    Args:
        q: int8 ``[M, K]``; gamma: fp32 ``[M]``; t: int8 ``[N, K]``; beta: fp32, 0-dim
        (per tensor) or ``[N]`` (per output row; column ``n`` of ``y`` uses ``beta[n]``).
    """
    acc = int_matmul_exact(q, t).to(torch.float32)
    s = activation_dequant_scale(gamma).reshape(-1, 1)
    beta = normalize_weight_scale(beta, t)
    y = (acc * s) * (beta if beta.dim() == 0 else beta.reshape(1, -1))
    return y.to(out_dtype)


def bitnet_dgrad(grad_output: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Input gradient (identity STE): ``dX = dY @ W_q`` with ``W_q = beta*T`` in dY's dtype.

    ``beta`` is 0-dim or per output row ``[N]`` (``t`` is ``[N, K]``).

    ``W_q`` is materialised in ``grad_output.dtype`` (for bf16 this rounds beta to bf16, as a
    bf16 reference implementation does), the product accumulates in the matmul's precision.
    """
    wq = dequantize_weight(t, beta, grad_output.dtype)
    return torch.matmul(grad_output, wq)


def bitnet_wgrad(
    grad_output: torch.Tensor,
    q: torch.Tensor,
    gamma: torch.Tensor,
    main_grad: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Weight gradient (identity STE): ``dW = dY^T @ x_q`` with ``x_q`` dequantised from Q, gamma.

    Args:
        grad_output: ``[M, N]``; q: int8 ``[M, K]``; gamma: fp32 ``[M]``.
        main_grad: if given, ``dW`` is computed in fp32 (from fp32 copies of dY and x_q, where
            x_q is first rounded to dY's dtype exactly like the GPU kernels do) and accumulated
            into it in place; None is returned.

    Returns:
        ``dW`` ``[N, K]`` in ``grad_output.dtype``, or None when accumulating into main_grad.
    """
    xq = dequantize_activation(q, gamma, grad_output.dtype)
    if main_grad is None:
        return torch.matmul(grad_output.t(), xq)
    main_grad.add_(torch.matmul(grad_output.t().to(torch.float32), xq.to(torch.float32)))
    return None
