# Copyright (c) 2026, falcon-mcore authors. All rights reserved.
"""Pure PyTorch reference implementation of BitNet b1.58 quantisation.

This module is the numerical definition that every other backend (the Triton kernels in
``triton_kernels.py``) must reproduce bit for bit.  It runs on any device (CPU and CUDA) and
never synchronises with the host (no ``.item()``, no data-dependent Python control flow).

Definitions (DESIGN.md section 4), all scale arithmetic in IEEE fp32 unless stated:

Weight (per tensor, or per logical tensor when shards are reduced by the caller)::

    beta = max(fp32(sum|W| / numel), 1e-5)     # sum accumulated in fp64
    T    = clamp(round(fp32(W) / beta), -1, 1)  # int8 in {-1, 0, 1}
    W_q  = beta * T

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

* weight: :func:`weight_abs_sum` (local fp64 sum) -> all-reduce SUM ->
  :func:`weight_scale_from_abs_sum` (with the global element count) ->
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
    "weight_scale_from_abs_sum",
    "weight_scale",
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


def weight_scale_from_abs_sum(abs_sum: torch.Tensor, numel: int) -> torch.Tensor:
    """``beta = max(fp32(abs_sum / numel), 1e-5)`` as a 0-dim fp32 tensor (no host sync)."""
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    abs_sum = abs_sum.to(torch.float64)
    # Divide by a tensor, not a Python scalar: on CUDA, torch turns division by a scalar into
    # a multiplication by its reciprocal, which is not the IEEE quotient.
    denom = torch.full((), float(numel), dtype=torch.float64, device=abs_sum.device)
    mean = (abs_sum / denom).to(torch.float32)
    return mean.clamp_min(EPS)


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor weight scale ``beta = max(mean|W|, 1e-5)`` (0-dim fp32)."""
    return weight_scale_from_abs_sum(weight_abs_sum(weight), weight.numel())


def quantize_weight(
    weight: torch.Tensor, beta: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ternary weight quantisation.

    Args:
        weight: full-precision weight of any shape and floating dtype.
        beta: optional externally computed scale (0-dim or 1-element fp32 tensor), e.g. the
            cross-rank mean of a tensor-parallel weight.  Computed from ``weight`` if None.

    Returns:
        ``(T, beta)``: ``T`` int8 with values in {-1, 0, 1}, same shape as ``weight``;
        ``beta`` 0-dim fp32.
    """
    if beta is None:
        beta = weight_scale(weight)
    beta = beta.reshape(()).to(device=weight.device, dtype=torch.float32)
    w = weight.detach().to(torch.float32)
    t = torch.round(w / beta).clamp_(-1.0, 1.0).to(torch.int8)
    return t, beta


def dequantize_weight(
    t: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W_q = beta * T`` computed in fp32 and cast to ``dtype``."""
    return (t.to(torch.float32) * beta.reshape(()).to(torch.float32)).to(dtype)


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
        q: int8 ``[M, K]``; gamma: fp32 ``[M]``; t: int8 ``[N, K]``; beta: 0-dim fp32.
    """
    acc = int_matmul_exact(q, t).to(torch.float32)
    s = activation_dequant_scale(gamma).reshape(-1, 1)
    y = (acc * s) * beta.reshape(()).to(torch.float32)
    return y.to(out_dtype)


def bitnet_dgrad(grad_output: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Input gradient (identity STE): ``dX = dY @ W_q`` with ``W_q = beta*T`` in dY's dtype.

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
