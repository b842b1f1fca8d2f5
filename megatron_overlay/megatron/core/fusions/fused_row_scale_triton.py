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

For a parameter whose gradient the data-parallel wrapper adds into a float32 ``main_grad``, the
backward scales the gradient and adds it there in the same pass (``scale_rows_accumulate_``; the
bits of scaling, then adding), instead of writing the scaled gradient for the wrapper's hook to
read and add: one pass over the weight-sized gradient instead of two.
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
def _scaled_block(src_ptr, scale_ptr, cols, BLOCK: tl.constexpr):
    """This program's block of ``src[r, :] * scale[r]`` (program: row, column block), each
    element ``float32(src) * float32(scale)`` rounded once to ``src``'s dtype (to nearest even);
    returns the elements' offsets, their mask and the values."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < cols
    scale = tl.load(scale_ptr + row).to(tl.float32)
    product = tl.load(src_ptr + row * cols + columns, mask=mask).to(tl.float32) * scale
    if src_ptr.dtype.element_ty == tl.bfloat16:
        scaled = _round_to_bfloat16(product)
    else:
        scaled = product.to(src_ptr.dtype.element_ty)
    return row * cols + columns, mask, scaled


@triton.jit
def _scale_rows_kernel(src_ptr, scale_ptr, dst_ptr, cols, BLOCK: tl.constexpr):
    """``dst[r, c] = src[r, c] * scale[r]`` (``dst`` in ``src``'s dtype)."""
    offsets, mask, scaled = _scaled_block(src_ptr, scale_ptr, cols, BLOCK)
    tl.store(dst_ptr + offsets, scaled, mask=mask)


@triton.jit
def _scale_rows_accumulate_kernel(grad_ptr, scale_ptr, main_ptr, cols, BLOCK: tl.constexpr):
    """``main[r, c] += float32(grad[r, c] * scale[r])``, the product rounded to the gradient's
    dtype first, as :func:`scale_rows` writes it."""
    offsets, mask, scaled = _scaled_block(grad_ptr, scale_ptr, cols, BLOCK)
    main = tl.load(main_ptr + offsets, mask=mask)
    tl.store(main_ptr + offsets, main + scaled.to(tl.float32), mask=mask)


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


def scale_rows_accumulate_(
    main_grad: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``main_grad += scale_rows(grad, scale)`` in one pass (same bits: the product is rounded
    to ``grad``'s dtype, then added in float32) for a contiguous float32 ``main_grad`` of
    ``grad``'s shape. Returns ``main_grad``."""
    if (
        main_grad.dtype != torch.float32
        or main_grad.shape != grad.shape
        or not main_grad.is_contiguous()
        or grad.dim() != 2
        or scale.shape != (grad.shape[0],)
        or scale.dtype != grad.dtype
    ):
        raise ValueError(
            "scale_rows_accumulate_: needs a contiguous float32 main_grad of the 2-D grad's shape "
            f"and one scale per row in grad's dtype, got {main_grad.dtype} "
            f"{tuple(main_grad.shape)}, {grad.dtype} {tuple(grad.shape)} and {scale.dtype} "
            f"{tuple(scale.shape)}"
        )
    if not (runs_triton(main_grad) and runs_triton(grad) and runs_triton(scale)):
        raise ValueError("scale_rows_accumulate_: needs CUDA tensors (or TRITON_INTERPRET=1)")
    grad = grad.contiguous()
    rows, cols = grad.shape
    if grad.numel():
        grid = (rows, triton.cdiv(cols, _BLOCK))
        # No fused multiply-add: for a float32 gradient it would round product and sum once,
        # not the twice of scaling, then adding.
        _scale_rows_accumulate_kernel[grid](
            grad, scale.contiguous(), main_grad, cols, BLOCK=_BLOCK, enable_fp_fusion=False
        )
    return main_grad


def _main_grad_to_accumulate(weight: torch.Tensor, grad: torch.Tensor):
    """The ``main_grad`` the backward adds ``weight``'s gradient into directly, or None: a leaf
    parameter with a float32 ``main_grad`` of its shape under the data-parallel wrapper's
    protocol (``grad_added_to_main_grad``, as for gradient-accumulation fusion), not one whose
    hook adds a zeroed gradient (``zero_out_wgrad``)."""
    main_grad = getattr(weight, "main_grad", None)
    if (
        main_grad is None
        or not weight.is_leaf
        or not hasattr(weight, "grad_added_to_main_grad")
        or getattr(weight, "zero_out_wgrad", False)
        or main_grad.dtype != torch.float32
        or main_grad.shape != grad.shape
        or not main_grad.is_contiguous()
    ):
        return None
    return main_grad


class _ScaleRows(torch.autograd.Function):
    """``weight * scale[:, None]``; the gradient of ``weight`` is scaled the same way.

    Where the weight is a parameter whose gradient the data-parallel wrapper adds into a float32
    ``main_grad`` (:func:`_main_grad_to_accumulate`), the backward scales and adds in one pass
    (:func:`scale_rows_accumulate_`, same bits as scaling, then the wrapper's add), marks the
    parameter ``grad_added_to_main_grad`` and hands autograd an unwritten placeholder gradient
    that the wrapper's hook skips, as Megatron's gradient-accumulation fusion does."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # pylint: disable=arguments-differ
        """The scaled weight."""
        ctx.save_for_backward(scale)
        ctx.weight = weight
        return scale_rows(weight, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # pylint: disable=arguments-differ
        """``grad * scale[:, None]`` (or added into ``main_grad``); no gradient for the
        (constant) scale."""
        (scale,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = _main_grad_to_accumulate(weight, grad)
        if main_grad is None:
            return scale_rows(grad, scale), None
        scale_rows_accumulate_(main_grad, grad, scale)
        weight.grad_added_to_main_grad = True
        return torch.empty_like(grad, requires_grad=False), None


def row_scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Differentiable ``weight * scale[:, None]`` through :func:`scale_rows` (``scale`` is a
    constant: it gets no gradient)."""
    return _ScaleRows.apply(weight, scale)
