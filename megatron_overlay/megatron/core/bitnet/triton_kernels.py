# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Triton kernels for BitNet b1.58 training (written for this project; Hopper/H100 tuned).

Kernels (each reproduces the definitions of :mod:`megatron.core.bitnet.quant` exactly):

* ``_act_quant_kernel``: per-token absmax + int8 quantisation.  One program owns
  ``BLOCK_M`` whole rows; for ``K <= MAX_SINGLE_PASS_K`` the row is loaded once into
  registers (x read once from HBM), reduced to gamma and quantised.  Longer rows use a
  two-pass loop (the second pass mostly hits L2).  Optionally takes an external gamma
  (tensor-parallel MAX-reduced) instead of computing it.
* ``_act_absmax_kernel``: per-token gamma only (for the tensor-parallel two-phase path).
* ``_weight_abs_sum_kernel``: per-block fp64 partial sums of ``|W|``; the partials are summed
  on device (``torch.sum``), so beta never touches the host.
* ``_weight_row_abs_sum_kernel``: per-output-row fp64 sums of ``|W|`` (inputs of per-segment
  scales, e.g. q / k / v of a fused QKV weight).
* ``_weight_quant_kernel``: ``T = clamp(rint(W / beta), -1, 1)`` as int8, reading beta from
  device memory; optionally also writes the dense ``beta*T`` copy in a 16-bit dtype.
* ``_weight_dequant_kernel``: ``dtype(beta * T)`` from the cached int8 ``T`` (the transient
  operand of the default cuBLAS input gradient; same values as the dense copy above).
* ``_fwd_kernel``: ``y = fp32(fp32(Q @ T^T) * s_row) * beta`` with an int8 x int8 -> int32
  ``tl.dot`` (int8 tensor cores) and the scales fused in the epilogue.
* ``_dgrad_kernel``: ``dX = fp32(dY @ bf16(T)) * beta`` (T converted in the operand load,
  beta applied in fp32 in the epilogue; no dense ``beta*T`` copy needed).  With a per-row
  beta the scale lies along the reduction dimension, so it is applied in the operand load
  instead: ``dX = dY @ dtype(beta[n] * T)`` (the same operand as the dense copy).
* ``_wgrad_kernel``: ``dW = dY^T @ x_q`` with ``x_q = bf16(Q * s_row)`` dequantised in the
  operand load from the saved int8 activations; optionally accumulates in place into an fp32
  ``main_grad`` (gradient-accumulation fusion).
* ``_act_dequant_kernel``: ``x_q = bf16(Q * s_row)`` (input of the cuBLAS weight gradient).

Weight scale ``beta``: a scalar (one value per weight) or one value per output row (``[N]``,
for weights that fuse several logical matrices).  A ``BETA_PER_ROW`` constexpr selects the
variant at compile time, so the scalar case loads a single value exactly as before.

Both backward kernels compute the transposed product (``dX^T = T^T dY^T``,
``dW^T = x_q^T dY``) so that the operand converted in registers is the left one, which
Hopper's wgmma may take from registers; on one H100 (triton 3.6) this ran 1.15-1.35x faster
than the direct formulation but still 1.25-1.4x slower than cuBLAS bf16, so
:mod:`.functional` uses cuBLAS for the backward by default (``--bitnet-dgrad`` /
``--bitnet-wgrad`` select these kernels), on operands dequantised by the elementwise kernels
here.  The int8 forward
GEMM ran about 1.65x faster than cuBLAS bf16.

Rounding: round-half-to-even.  On the GPU it is ``libdevice.rint`` (``cvt.rni``); the Triton
CPU interpreter cannot run libdevice, so there the kernels use the exact fp32 identity
``rint(v) = (v + 1.5*2**23) - 1.5*2**23`` (valid for ``|v| < 2**22``; arguments are clamped
to a small range first, which does not change the clamped result).  Divisions use
``tl.div_rn`` (IEEE round-to-nearest), never Triton's approximate ``/``.  The activation
kernel also emits the per-token ``s = gamma / 127`` (``div_rn``) used by the GEMMs, identical
to :func:`megatron.core.bitnet.quant.activation_dequant_scale`.

Import of this module requires triton; :mod:`megatron.core.bitnet.functional` only imports
it lazily.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

__all__ = [
    "interpret_mode",
    "act_quant",
    "act_absmax",
    "act_dequant",
    "weight_abs_sum",
    "weight_row_abs_sums",
    "weight_quant",
    "weight_dequant",
    "bitnet_fwd",
    "bitnet_dgrad",
    "bitnet_wgrad",
]

#: Rows up to this length are quantised from registers in a single pass over HBM.
MAX_SINGLE_PASS_K = 16384
_CHUNK_K = 4096
_EW_BLOCK = 8192  # elementwise block for weight kernels
_MAGIC = 12582912.0  # 1.5 * 2**23


# Triton decides at decoration time (i.e. when this module is imported) whether the kernels
# are compiled or interpreted; freeze that decision so launch parameters always match it.
try:
    _INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs module
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpret_mode() -> bool:
    """True when this module's kernels run in the Triton CPU interpreter.

    Fixed when the module is imported (``TRITON_INTERPRET=1`` in the environment then).
    """
    return _INTERPRET


def _autotune_enabled() -> bool:
    return (not interpret_mode()) and os.environ.get("BITNET_TRITON_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _rint(v, USE_LIBDEVICE: tl.constexpr):
    """Round half to even (v must be clamped to |v| < 2**22 by the caller)."""
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return r


# --------------------------------------------------------------------------------------------
# Activation quantisation
# --------------------------------------------------------------------------------------------


@triton.jit
def _quant_block(x, gamma, USE_LIBDEVICE: tl.constexpr):
    """Q = clamp(rint(fp32(x*127) / gamma), -128, 127) for an fp32 block x [BM, BK]."""
    g = tl.broadcast_to(gamma[:, None], x.shape)
    v = tl.div_rn(x * 127.0, g)
    v = tl.minimum(tl.maximum(v, -256.0), 256.0)
    r = _rint(v, USE_LIBDEVICE)
    r = tl.minimum(tl.maximum(r, -128.0), 127.0)
    return r.to(tl.int8)


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    gamma_out_ptr,
    gamma_in_ptr,
    s_out_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    HAS_GAMMA: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * stride_xm
    q_row = q_ptr + rows64[:, None] * stride_qm
    if HAS_GAMMA:
        gamma = tl.load(gamma_in_ptr + rows, mask=rmask, other=1.0)
        tl.store(
            s_out_ptr + rows, tl.div_rn(gamma, tl.full(gamma.shape, 127.0, tl.float32)), mask=rmask
        )
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if not HAS_GAMMA:
            gamma = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-5)
            tl.store(gamma_out_ptr + rows, gamma, mask=rmask)
            s = tl.div_rn(gamma, tl.full(gamma.shape, 127.0, tl.float32))
            tl.store(s_out_ptr + rows, s, mask=rmask)
        tl.store(q_row + cols[None, :], _quant_block(x, gamma, USE_LIBDEVICE), mask=mask)
    else:
        if not HAS_GAMMA:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                mask = rmask[:, None] & (cols[None, :] < K)
                x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            gamma = tl.maximum(amax, 1e-5)
            tl.store(gamma_out_ptr + rows, gamma, mask=rmask)
            s = tl.div_rn(gamma, tl.full(gamma.shape, 127.0, tl.float32))
            tl.store(s_out_ptr + rows, s, mask=rmask)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols[None, :], _quant_block(x, gamma, USE_LIBDEVICE), mask=mask)


@triton.jit
def _act_absmax_kernel(
    x_ptr, gamma_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    tl.store(gamma_ptr + rows, tl.maximum(amax, 1e-5), mask=rmask)


def _act_launch_params(k: int) -> Tuple[bool, int, int, int]:
    """(single_pass, BLOCK_M, BLOCK_K, num_warps) for rows of length k."""
    if k <= MAX_SINGLE_PASS_K:
        block_k = triton.next_power_of_2(k)
        single = True
    else:
        block_k = _CHUNK_K
        single = False
    block_m = max(1, min(16, 16384 // block_k))
    if interpret_mode():
        block_m = min(block_m, 4)
    num_warps = 16 if block_m * block_k >= 16384 else 8 if block_m * block_k >= 4096 else 4
    return single, block_m, block_k, num_warps


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def act_quant(
    x: torch.Tensor, gamma: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantisation of ``x [..., K]``.

    Returns ``(Q [M, K] int8, gamma [M] fp32, s [M] fp32)`` with ``M = x.numel() // K`` and
    ``s = gamma / 127`` (IEEE division, the dequantisation factor used by the GEMMs).  With
    ``gamma`` given (``M`` elements, fp32) it is used as is.
    """
    x2 = _rows_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if gamma is not None:
        gamma_in = gamma.reshape(-1).to(dtype=torch.float32).contiguous()
        if gamma_in.numel() != m:
            raise ValueError(f"gamma has {gamma_in.numel()} elements, expected {m}")
        gamma_out = gamma_in
    else:
        gamma_out = torch.empty((m,), dtype=torch.float32, device=x.device)
        gamma_in = gamma_out
    if m == 0:
        return q, gamma_out, s
    single, block_m, block_k, num_warps = _act_launch_params(k)
    grid = (triton.cdiv(m, block_m),)
    _act_quant_kernel[grid](
        x2,
        q,
        gamma_out,
        gamma_in,
        s,
        m,
        k,
        x2.stride(0),
        q.stride(0),
        HAS_GAMMA=gamma is not None,
        SINGLE_PASS=single,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        USE_LIBDEVICE=not interpret_mode(),
        num_warps=num_warps,
    )
    return q, gamma_out, s


def act_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-token ``gamma = max(max|x|, 1e-5)`` of ``x [..., K]`` as fp32 ``[M]``."""
    x2 = _rows_2d(x)
    m, k = x2.shape
    gamma = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return gamma
    block_k = min(triton.next_power_of_2(k), _CHUNK_K)
    block_m = max(1, min(16, 8192 // block_k))
    if interpret_mode():
        block_m = min(block_m, 4)
    _act_absmax_kernel[(triton.cdiv(m, block_m),)](
        x2, gamma, m, k, x2.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8
    )
    return gamma


@triton.jit
def _act_dequant_kernel(q_ptr, s_ptr, out_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    s = tl.load(s_ptr + rows, mask=rows < M, other=0.0)
    qv = tl.load(q_ptr + offs, mask=mask, other=0)
    tl.store(
        out_ptr + offs, (qv.to(tl.float32) * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask
    )


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x_q = (fp32(Q) * s_row)`` cast to ``dtype``; q int8 ``[M, K]``, s fp32 ``[M]``."""
    q = q.contiguous()
    m, k = q.shape
    out = torch.empty((m, k), dtype=dtype, device=q.device)
    if q.numel() == 0:
        return out
    s = s.reshape(-1).to(torch.float32).contiguous()
    block_m, block_k = (4, 32) if interpret_mode() else (16, 512)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _act_dequant_kernel[grid](q, s, out, m, k, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8)
    return out


# --------------------------------------------------------------------------------------------
# Weight quantisation
# --------------------------------------------------------------------------------------------


@triton.jit
def _weight_abs_sum_kernel(w_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0)
    a = tl.abs(w.to(tl.float32)).to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(a, axis=0))


@triton.jit
def _weight_row_abs_sum_kernel(
    w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    w_row = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < K)
        w = tl.load(w_row + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tl.abs(w.to(tl.float32)).to(tl.float64), axis=1)
    tl.store(out_ptr + rows, acc, mask=rmask)


@triton.jit
def _weight_quant_kernel(
    w_ptr,
    beta_ptr,
    t_ptr,
    dense_ptr,
    numel,
    K,
    WRITE_DENSE: tl.constexpr,
    BETA_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BETA_PER_ROW:
        # Contiguous [N, K] weight: element offs lies in row offs // K.
        beta = tl.load(beta_ptr + offs // K, mask=mask, other=1.0)
    else:
        beta = tl.broadcast_to(tl.load(beta_ptr), w.shape)
    v = tl.div_rn(w, beta)
    v = tl.minimum(tl.maximum(v, -4.0), 4.0)
    r = _rint(v, USE_LIBDEVICE)
    r = tl.minimum(tl.maximum(r, -1.0), 1.0)
    tl.store(t_ptr + offs, r.to(tl.int8), mask=mask)
    if WRITE_DENSE:
        tl.store(dense_ptr + offs, (r * beta).to(dense_ptr.dtype.element_ty), mask=mask)


def weight_abs_sum(weight: torch.Tensor) -> torch.Tensor:
    """``sum|W|`` in fp64 as a 0-dim device tensor (block partials summed on device)."""
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    numel = w.numel()
    nblocks = max(1, triton.cdiv(numel, _EW_BLOCK))
    partial = torch.zeros((nblocks,), dtype=torch.float64, device=w.device)
    if numel > 0:
        _weight_abs_sum_kernel[(nblocks,)](w, partial, numel, BLOCK=_EW_BLOCK, num_warps=8)
    return partial.sum()


def weight_row_abs_sums(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-row ``sum|W[n, :]|`` in fp64 (``[N]``) of a weight ``[N, ...]``."""
    w = weight.detach()
    w2 = w.reshape(w.shape[0], -1) if w.dim() != 2 else w
    if w2.numel() > 0 and w2.stride(-1) != 1:
        w2 = w2.contiguous()
    n, k = w2.shape
    out = torch.zeros((n,), dtype=torch.float64, device=w.device)
    if n == 0 or k == 0:
        return out
    block_k = min(triton.next_power_of_2(k), 1024)
    block_n = max(1, min(16, 8192 // block_k))
    if interpret_mode():
        block_n = min(block_n, 4)
    _weight_row_abs_sum_kernel[(triton.cdiv(n, block_n),)](
        w2, out, n, k, w2.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8
    )
    return out


def _beta_arg(beta: torch.Tensor, n_rows: int) -> Tuple[torch.Tensor, bool]:
    """(contiguous fp32 beta, per_row): 1 element -> scalar, ``n_rows`` elements -> per row."""
    beta = beta.reshape(-1).to(dtype=torch.float32).contiguous()
    if beta.numel() == 1:
        return beta, False
    if beta.numel() != n_rows:
        raise ValueError(f"beta has {beta.numel()} elements; expected 1 or {n_rows} (one per row)")
    return beta, True


def weight_quant(
    weight: torch.Tensor, beta: torch.Tensor, dense_dtype: Optional[torch.dtype] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ternary ``T`` (int8, weight's shape) and optionally ``beta*T`` in ``dense_dtype``.

    ``beta``: one element (per tensor) or ``N`` elements (one per output row of ``[N, ...]``).
    """
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    n_rows = w.shape[0] if w.dim() >= 1 else 1
    beta, per_row = _beta_arg(beta, n_rows)
    t = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    dense = (
        None if dense_dtype is None else torch.empty(w.shape, dtype=dense_dtype, device=w.device)
    )
    numel = w.numel()
    if numel > 0:
        _weight_quant_kernel[(triton.cdiv(numel, _EW_BLOCK),)](
            w,
            beta,
            t,
            dense if dense is not None else t,
            numel,
            numel // max(n_rows, 1),
            WRITE_DENSE=dense is not None,
            BETA_PER_ROW=per_row,
            BLOCK=_EW_BLOCK,
            USE_LIBDEVICE=not interpret_mode(),
            num_warps=8,
        )
    return t, dense


@triton.jit
def _weight_dequant_kernel(
    t_ptr, beta_ptr, out_ptr, numel, K, BETA_PER_ROW: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(t_ptr + offs, mask=mask, other=0).to(tl.float32)
    if BETA_PER_ROW:
        beta = tl.load(beta_ptr + offs // K, mask=mask, other=1.0)
    else:
        beta = tl.broadcast_to(tl.load(beta_ptr), r.shape)
    tl.store(out_ptr + offs, (r * beta).to(out_ptr.dtype.element_ty), mask=mask)


def weight_dequant(t: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_q = dtype(fp32(T) * beta)`` from int8 ``T [N, ...]``; beta 1 element or ``[N]``.

    Bit-identical to the dense copy of :func:`weight_quant` and to
    :func:`megatron.core.bitnet.quant.dequantize_weight`.  One read of 1 byte and one write of
    ``dtype``'s size per element.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    n_rows = t.shape[0] if t.dim() >= 1 else 1
    beta, per_row = _beta_arg(beta, n_rows)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    numel = t.numel()
    if numel > 0:
        _weight_dequant_kernel[(triton.cdiv(numel, _EW_BLOCK),)](
            t,
            beta,
            out,
            numel,
            numel // max(n_rows, 1),
            BETA_PER_ROW=per_row,
            BLOCK=_EW_BLOCK,
            num_warps=8,
        )
    return out


# --------------------------------------------------------------------------------------------
# GEMMs
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) mapping of a linear program id to (pid_m, pid_n)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fwd_kernel(
    q_ptr,
    t_ptr,
    s_ptr,
    beta_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_qm,
    stride_tn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    BETA_PER_ROW: tl.constexpr,
):
    """y[M, N] = (fp32(Q[M, K] @ T[N, K]^T) * s[M]) * beta (beta scalar or per column n)."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped row/col indices keep loads in bounds without masks (stores are masked).
    rma = (rm % M).to(tl.int64)
    rna = (rn % N).to(tl.int64)
    a_ptrs = q_ptr + rma[:, None] * stride_qm + rk[None, :]
    b_ptrs = t_ptr + rna[None, :] * stride_tn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_rem = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_rem, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_rem, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    s = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
    y = acc.to(tl.float32) * s[:, None]
    if BETA_PER_ROW:
        beta_n = tl.load(beta_ptr + rn, mask=rn < N, other=0.0)
        y = y * beta_n[None, :]
    else:
        beta = tl.load(beta_ptr)
        y = y * beta
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dgrad_kernel(
    dy_ptr,
    t_ptr,
    beta_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_tn,
    stride_dxm,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    IEEE: tl.constexpr,
    BETA_PER_ROW: tl.constexpr,
):
    """Transposed dgrad: tile ``dX^T[BLOCK_K, BLOCK_M] = bf16(T^T) @ dY^T`` (* beta).

    The converted int8 operand is the left (A) operand, which Hopper's wgmma can read from
    registers; dY^T is the right operand read from shared memory in its natural K-major form.
    A per-row beta (indexed by the reduction index n) scales that operand instead:
    ``A = dtype(T^T * beta[n])``, and the epilogue applies no scale.
    """
    pid = tl.program_id(0)
    pid_k, pid_m = _tile_ids(pid, tl.cdiv(K, BLOCK_K), tl.cdiv(M, BLOCK_M), GROUP_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rka = rk % K
    rma = (rm % M).to(tl.int64)
    a_ptrs = t_ptr + rn.to(tl.int64)[None, :] * stride_tn + rka[:, None]  # [BLOCK_K, BLOCK_N]
    b_ptrs = dy_ptr + rma[None, :] * stride_dym + rn[:, None]  # [BLOCK_N, BLOCK_M]
    beta_ptrs = beta_ptr + rn
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for nn in range(0, tl.cdiv(N, BLOCK_N)):
        if EVEN_N:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            if BETA_PER_ROW:
                beta_n = tl.load(beta_ptrs)
        else:
            n_rem = N - nn * BLOCK_N
            a = tl.load(a_ptrs, mask=rn[None, :] < n_rem, other=0)
            b = tl.load(b_ptrs, mask=rn[:, None] < n_rem, other=0.0)
            if BETA_PER_ROW:
                beta_n = tl.load(beta_ptrs, mask=rn < n_rem, other=0.0)
        if BETA_PER_ROW:
            a = (a.to(tl.float32) * beta_n[None, :]).to(b.dtype)
        else:
            a = a.to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_N * stride_tn
        b_ptrs += BLOCK_N
        beta_ptrs += BLOCK_N
    if BETA_PER_ROW:
        out = acc
    else:
        beta = tl.load(beta_ptr)
        out = acc * beta
    dx_ptrs = dx_ptr + rm.to(tl.int64)[None, :] * stride_dxm + rk[:, None]
    tl.store(dx_ptrs, out.to(dx_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rm[None, :] < M))


@triton.jit
def _wgrad_kernel(
    dy_ptr,
    q_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_qm,
    stride_on,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Transposed wgrad: tile ``dW^T[BLOCK_K, BLOCK_N] = bf16(Q^T * s) @ dY`` (reduction over
    tokens), stored (or accumulated) into ``dW[N, K]``; the dequantised operand is A."""
    pid = tl.program_id(0)
    pid_k, pid_n = _tile_ids(pid, tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N), GROUP_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rka = rk % K
    rna = rn % N
    rm64 = rm.to(tl.int64)
    a_ptrs = q_ptr + rm64[None, :] * stride_qm + rka[:, None]  # [BLOCK_K, BLOCK_M] = Q^T
    b_ptrs = dy_ptr + rm64[:, None] * stride_dym + rna[None, :]  # [BLOCK_M, BLOCK_N] = dY
    s_ptrs = s_ptr + rm
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for mm in range(0, tl.cdiv(M, BLOCK_M)):
        if EVEN_M:
            qv = tl.load(a_ptrs)
            s = tl.load(s_ptrs)
            b = tl.load(b_ptrs)
        else:
            m_rem = M - mm * BLOCK_M
            qv = tl.load(a_ptrs, mask=rm[None, :] < m_rem, other=0)
            s = tl.load(s_ptrs, mask=rm < m_rem, other=0.0)
            b = tl.load(b_ptrs, mask=rm[:, None] < m_rem, other=0.0)
        a = (qv.to(tl.float32) * s[None, :]).to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_M * stride_qm
        b_ptrs += BLOCK_M * stride_dym
        s_ptrs += BLOCK_M
    o_ptrs = out_ptr + rn.to(tl.int64)[None, :] * stride_on + rk[:, None]
    omask = (rk[:, None] < K) & (rn[None, :] < N)
    if ACCUMULATE:
        prev = tl.load(o_ptrs, mask=omask, other=0.0)
        tl.store(o_ptrs, prev + acc, mask=omask)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), group=8):
    return triton.Config(
        {names[0]: bm, names[1]: bn, names[2]: bk, "GROUP_M": group},
        num_warps=warps,
        num_stages=stages,
    )


# H100 candidates.  int8 tiles use BLOCK_K=128 (one 128-byte row per K step); bf16 tiles 64.
_FWD_CONFIGS = [
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 256, 128, 8, 4),
    _cfg(256, 128, 128, 8, 3),
    _cfg(256, 128, 128, 8, 4),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 128, 4, 4),
    _cfg(128, 256, 64, 8, 4),
    _cfg(128, 256, 64, 8, 5),
]
# Backward GEMMs: names are (rows of the output tile, its columns, reduction block).  Both
# compute the transposed product so that the converted int8 operand is the left operand.
_DGRAD_NAMES = ("BLOCK_K", "BLOCK_M", "BLOCK_N")
_DGRAD_CONFIGS = [
    _cfg(128, 256, 64, 8, 3, _DGRAD_NAMES),
    _cfg(128, 256, 64, 8, 4, _DGRAD_NAMES),
    _cfg(256, 128, 64, 8, 3, _DGRAD_NAMES),
    _cfg(128, 128, 64, 8, 4, _DGRAD_NAMES),
    _cfg(128, 128, 64, 4, 4, _DGRAD_NAMES),
]
_WGRAD_NAMES = ("BLOCK_K", "BLOCK_N", "BLOCK_M")
_WGRAD_CONFIGS = [
    _cfg(128, 256, 64, 8, 3, _WGRAD_NAMES),
    _cfg(128, 256, 64, 8, 4, _WGRAD_NAMES),
    _cfg(256, 128, 64, 8, 3, _WGRAD_NAMES),
    _cfg(128, 128, 64, 8, 4, _WGRAD_NAMES),
    _cfg(128, 128, 64, 4, 4, _WGRAD_NAMES),
]
# Used without autotuning (BITNET_TRITON_AUTOTUNE=0, --quick) and small fallback tiles for the
# CPU interpreter.
_FWD_DEFAULT = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
_INTERP_TILE = 32
_DGRAD_DEFAULT = dict(BLOCK_K=128, BLOCK_M=128, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
_WGRAD_DEFAULT = dict(BLOCK_K=128, BLOCK_N=128, BLOCK_M=64, GROUP_M=8, num_warps=4, num_stages=4)

_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "BETA_PER_ROW"])(_fwd_kernel)
_dgrad_tuned = triton.autotune(configs=_DGRAD_CONFIGS, key=["M", "N", "K", "BETA_PER_ROW"])(
    _dgrad_kernel
)
_wgrad_tuned = triton.autotune(
    configs=_WGRAD_CONFIGS, key=["M", "N", "K", "ACCUMULATE"], restore_value=["out_ptr"]
)(_wgrad_kernel)


def _interp_meta(names: Tuple[str, str, str]) -> dict:
    return {names[0]: _INTERP_TILE, names[1]: _INTERP_TILE, names[2]: _INTERP_TILE, "GROUP_M": 2}


def _check_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_2d(tuned, kernel, names, default, dims, args, flags, even):
    """Launch a GEMM kernel whose output tile is (names[0] x names[1]) over dims=(rows, cols)
    and whose reduction block is names[2]; ``even=(flag_name, reduction_len)``."""
    rows, cols = dims
    even_name, red_len = even
    if _autotune_enabled():
        red_blocks = {c.kwargs[names[2]] for c in tuned.configs}
        even_val = all(red_len % b == 0 for b in red_blocks)
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(rows, meta[names[0]]) * triton.cdiv(cols, meta[names[1]]),
        )
        tuned[grid](*args, **flags, **{even_name: even_val})
    else:
        meta = dict(_interp_meta(names)) if interpret_mode() else dict(default)
        grid = (triton.cdiv(rows, meta[names[0]]) * triton.cdiv(cols, meta[names[1]]),)
        kernel[grid](*args, **flags, **{even_name: red_len % meta[names[2]] == 0}, **meta)


def bitnet_fwd(
    q: torch.Tensor, s: torch.Tensor, t: torch.Tensor, beta: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``y = (fp32(Q @ T^T) * s_row) * beta`` in ``out_dtype``.

    Args:
        q: int8 ``[M, K]``; s: fp32 ``[M]`` (= gamma / 127); t: int8 ``[N, K]``;
        beta: fp32 device tensor, 0-dim/1-element (per tensor) or ``[N]`` (per output row).
    """
    q = _check_2d("q", q)
    t = _check_2d("t", t)
    m, k = q.shape
    n = t.shape[0]
    if t.shape[1] != k:
        raise ValueError(f"K mismatch: Q {tuple(q.shape)} vs T {tuple(t.shape)}")
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return y
    s = s.reshape(-1).to(torch.float32).contiguous()
    beta, per_row = _beta_arg(beta, n)
    args = (q, t, s, beta, y, m, n, k, q.stride(0), t.stride(0), y.stride(0))
    if _autotune_enabled():
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        )
        _fwd_tuned[grid](*args, EVEN_K=k % 128 == 0 and k % 64 == 0, BETA_PER_ROW=per_row)
    else:
        meta = (
            dict(_interp_meta(("BLOCK_M", "BLOCK_N", "BLOCK_K")))
            if interpret_mode()
            else dict(_FWD_DEFAULT)
        )
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _fwd_kernel[grid](*args, EVEN_K=k % meta["BLOCK_K"] == 0, BETA_PER_ROW=per_row, **meta)
    return y


def bitnet_dgrad(dy: torch.Tensor, t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``dX = fp32(dY @ bf16(T)) * beta`` in dY's dtype.  dy ``[M, N]``, t int8 ``[N, K]``.

    ``beta``: 1 element, or ``[N]`` per output row of T; then ``dX = dY @ dtype(beta[:, None]*T)``
    (beta applied to the operand, as in the dense copy).  No dense ``beta*T`` operand is
    materialised (the cuBLAS path needs one); slower than cuBLAS on H100.
    """
    dy = _check_2d("dy", dy)
    t = _check_2d("t", t)
    m, n = dy.shape
    k = t.shape[1]
    if t.shape[0] != n:
        raise ValueError(f"N mismatch: dY {tuple(dy.shape)} vs T {tuple(t.shape)}")
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    beta, per_row = _beta_arg(beta, n)
    ieee = dy.dtype == torch.float32
    args = (dy, t, beta, dx, m, n, k, dy.stride(0), t.stride(0), dx.stride(0))
    _launch_2d(
        _dgrad_tuned,
        _dgrad_kernel,
        _DGRAD_NAMES,
        _DGRAD_DEFAULT,
        (k, m),
        args,
        dict(IEEE=ieee, BETA_PER_ROW=per_row),
        ("EVEN_N", n),
    )
    return dx


def bitnet_wgrad(
    dy: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    main_grad: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """``dW = dY^T @ bf16(Q * s)`` (x_q in dY's dtype, fp32 accumulation).

    x_q is dequantised in the operand load (no bf16 x_q tensor in memory).

    Args:
        dy: ``[M, N]``; q: int8 ``[M, K]``; s: fp32 ``[M]`` (= gamma / 127).
        main_grad: optional fp32 ``[N, K]`` contiguous buffer; if given the result is added to
            it in place (gradient-accumulation fusion) and None is returned.
        out_dtype: dtype of the returned dW (default: dY's dtype).
    """
    dy = _check_2d("dy", dy)
    q = _check_2d("q", q)
    m, n = dy.shape
    k = q.shape[1]
    if q.shape[0] != m:
        raise ValueError(f"M mismatch: dY {tuple(dy.shape)} vs Q {tuple(q.shape)}")
    if main_grad is not None:
        if main_grad.dtype != torch.float32 or tuple(main_grad.shape) != (n, k):
            raise ValueError(
                f"main_grad must be fp32 [{n}, {k}], got {main_grad.dtype} "
                f"{tuple(main_grad.shape)}"
            )
        if not main_grad.is_contiguous():
            raise ValueError("main_grad must be contiguous")
        out = main_grad
    else:
        out = torch.empty((n, k), dtype=out_dtype or dy.dtype, device=dy.device)
    if n == 0 or k == 0:
        return None if main_grad is not None else out
    if m == 0:
        return None if main_grad is not None else out.zero_()
    s = s.reshape(-1).to(torch.float32).contiguous()
    ieee = dy.dtype == torch.float32
    args = (dy, q, s, out, m, n, k, dy.stride(0), q.stride(0), out.stride(0))
    acc = main_grad is not None
    _launch_2d(
        _wgrad_tuned,
        _wgrad_kernel,
        _WGRAD_NAMES,
        _WGRAD_DEFAULT,
        (k, n),
        args,
        dict(ACCUMULATE=acc, IEEE=ieee),
        ("EVEN_M", m),
    )
    return None if acc else out
