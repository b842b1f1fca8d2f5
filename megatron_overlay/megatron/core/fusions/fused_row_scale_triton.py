# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""A weight with its rows scaled, ``weight * scale[:, None]``, in one Triton pass each way.

Falcon-H1's per-channel multipliers (the key multiplier of ``linear_qkv``, the segment
multipliers of ``mamba_in_proj``, the gate multiplier of ``linear_fc1``) are folded into the
weight rows for training micro-batches (``ForwardMultipliers.scale_weight``). PyTorch computes
``weight * scale.unsqueeze(1)`` with its generic broadcasting kernel (not vectorised): on an H200
10.5 us for the 0.5B model's 3352 x 1024 bf16 ``mamba_in_proj`` weight, forward and again for the
gradient, where a vectorised add of a 16 MiB bf16 tensor took 11.3 us. These kernels read each
row once with its one scale.

Same bits as PyTorch: each element is ``float32(w) * float32(s)`` rounded once to the weight's
dtype (round to nearest even), as PyTorch's bf16/fp16 multiply computes it.
Needs CUDA tensors, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron.core.fusions.triton_support import runs_triton

_BLOCK = 1024


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest even (NaN -> 0x7FC0, as PyTorch's CPU cast), in
    integer arithmetic: Triton's CPU interpreter casts to bfloat16 by truncation."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _scale_rows_kernel(src_ptr, scale_ptr, dst_ptr, cols, BLOCK: tl.constexpr):
    """``dst[r, c] = src[r, c] * scale[r]``; program (row, column block)."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < cols
    scale = tl.load(scale_ptr + row).to(tl.float32)
    product = tl.load(src_ptr + row * cols + offsets, mask=mask).to(tl.float32) * scale
    if dst_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bfloat16(product)
    else:
        out = product.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + row * cols + offsets, out, mask=mask)


def scale_rows(matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``matrix * scale[:, None]`` (same dtype, same bits) for a 2-D ``matrix`` and a ``scale``
    of one value per row in ``matrix``'s dtype."""
    if matrix.dim() != 2 or scale.shape != (matrix.shape[0],) or scale.dtype != matrix.dtype:
        raise ValueError(
            "scale_rows: needs a 2-D matrix and one scale per row in its dtype, got "
            f"{tuple(matrix.shape)} {matrix.dtype} and {tuple(scale.shape)} {scale.dtype}"
        )
    if not (runs_triton(matrix) and runs_triton(scale)):
        raise ValueError("scale_rows: needs CUDA tensors (or TRITON_INTERPRET=1)")
    matrix = matrix.contiguous()
    out = torch.empty_like(matrix)
    rows, cols = matrix.shape
    if out.numel():
        grid = (rows, triton.cdiv(cols, _BLOCK))
        _scale_rows_kernel[grid](matrix, scale.contiguous(), out, cols, BLOCK=_BLOCK)
    return out


class _ScaleRows(torch.autograd.Function):
    """``weight * scale[:, None]``; the gradient of ``weight`` is scaled the same way."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # pylint: disable=arguments-differ
        """The scaled weight."""
        ctx.save_for_backward(scale)
        return scale_rows(weight, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # pylint: disable=arguments-differ
        """``grad * scale[:, None]``; no gradient for the (constant) scale."""
        (scale,) = ctx.saved_tensors
        return scale_rows(grad, scale), None


def row_scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Differentiable ``weight * scale[:, None]`` through :func:`scale_rows` (``scale`` is a
    constant: it gets no gradient)."""
    return _ScaleRows.apply(weight, scale)
