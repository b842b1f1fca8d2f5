# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Swapping the sequence and batch dimensions of hidden states, for batch-first Mamba layers.

``swap_leading_dims(x)`` returns ``x.transpose(0, 1).contiguous()`` (same bits), and its backward
returns the gradient swapped back, contiguous.

Only the two leading dimensions trade places; every ``[*rest]`` row stays one contiguous block
in both layouts. PyTorch's generic strided copy moves such rows one element at a time (on an
H200 21.4 us for a bf16 ``[2048, 4, 1024]`` tensor, where a contiguous add of that size took
11.3 us); viewing the rows as
8-byte words first moves a quarter as many elements, bit for bit. The gradient comes back
contiguous, so where it meets the other branch's gradient (Falcon-H1's parallel layers) the
two add as plain contiguous tensors instead of one strided, permuted sum followed by a copy.
"""

from __future__ import annotations

import torch

# Widest first: the element type the rows are copied as, where their bytes divide evenly.
_WORDS = (torch.int64, torch.int32, torch.int16)


def _word_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The widest integer type wider than ``x``'s elements whose size divides both a row's bytes
    and the tensor's byte offset, or None (also where ``x`` is not contiguous or complex)."""
    if x.dim() < 3 or not x.is_contiguous() or x.is_complex():
        return None
    row_bytes = x[0, 0].numel() * x.element_size()
    offset_bytes = x.storage_offset() * x.element_size()
    for word in _WORDS:
        size = torch.empty((), dtype=word).element_size()
        if size > x.element_size() and row_bytes % size == 0 and offset_bytes % size == 0:
            return word
    return None


def _swap(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(0, 1).contiguous()``, moving whole rows as integer words where possible."""
    word = _word_dtype(x)
    if word is None:
        return x.transpose(0, 1).contiguous()
    a, b = x.shape[:2]
    words = x.reshape(a, b, -1).view(word)
    swapped = words.transpose(0, 1).contiguous()
    return swapped.view(x.dtype).reshape(b, a, *x.shape[2:])


class _SwapLeadingDims(torch.autograd.Function):
    """``[a, b, *rest] -> [b, a, *rest]`` contiguous; the gradient is swapped back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """The swapped copy of ``x``."""
        return _swap(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """The gradient in ``x``'s layout, contiguous."""
        return _swap(grad)


def swap_leading_dims(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(0, 1).contiguous()`` with a contiguous gradient (see the module docstring).

    Args:
        x: a tensor of at least 3 dimensions, e.g. hidden states ``[s, b, h]``.

    Returns:
        The ``[b, s, h]`` copy, bit-identical to ``x.transpose(0, 1).contiguous()``.
    """
    if x.dim() < 3:
        raise ValueError(
            f"swap_leading_dims needs a tensor of >= 3 dims, got shape {tuple(x.shape)}"
        )
    return _SwapLeadingDims.apply(x)
