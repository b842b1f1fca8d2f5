# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""``main_grad += grad`` for the data-parallel wrapper's backward hooks, in one Triton pass.

Without gradient-accumulation fusion (no apex, or Transformer Engine linears whose weights carry
folded multipliers) every parameter's low-precision gradient is added into its float32
``main_grad`` after the backward (Falcon-H1-0.5B: 471 adds per step). PyTorch adds a bf16 tensor
into a float32 one with its dtype-casting elementwise kernel, which does not vectorise its loads
(on an H200 2.9 ms of the 0.5B step). The kernel here loads both in wide vectors and
adds in float32: the same bits (the bf16 value converts to float32 exactly, one float32 add).

CUDA tensors take the kernel where Triton is installed and the caller runs under CUDA graphs;
everything else ``main_grad.add_``. A Triton launch costs the host more than PyTorch's: with
graphs that is paid once, at capture, but an eager step that is host-bound would pay it for
every parameter of every step.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: PyTorch's add
    HAVE_TRITON = False

_BLOCK = 4096

if HAVE_TRITON:

    @triton.jit
    def _accumulate_kernel(main_ptr, grad_ptr, numel, BLOCK: tl.constexpr):
        """``main[i] += float32(grad[i])`` over one block."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        total = tl.load(main_ptr + offsets, mask=mask) + tl.load(grad_ptr + offsets, mask=mask).to(
            tl.float32
        )
        tl.store(main_ptr + offsets, total, mask=mask)


_GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernel_applies(main_grad: torch.Tensor, grad: torch.Tensor) -> bool:
    """A contiguous float32 ``main_grad`` and a contiguous ``grad`` of as many elements in one of
    ``_GRAD_DTYPES``."""
    return (
        main_grad.dtype == torch.float32
        and grad.dtype in _GRAD_DTYPES
        and main_grad.numel() == grad.numel()
        and main_grad.is_contiguous()
        and grad.is_contiguous()
    )


def triton_accumulate_(main_grad: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``main_grad += grad`` in the Triton kernel: a contiguous float32 ``main_grad`` and a
    contiguous ``grad`` of as many elements (bf16, fp16 or float32), on CUDA (or in Triton's
    CPU interpreter). Returns ``main_grad``."""
    if not HAVE_TRITON:
        raise RuntimeError("triton_accumulate_: Triton is not installed")
    if not _kernel_applies(main_grad, grad):
        raise ValueError(
            "triton_accumulate_: needs a contiguous float32 main_grad and a contiguous bf16, fp16 "
            f"or float32 grad of as many elements, got {main_grad.dtype} {tuple(main_grad.shape)} "
            f"and {grad.dtype} {tuple(grad.shape)}"
        )
    numel = main_grad.numel()
    if numel:
        _accumulate_kernel[(triton.cdiv(numel, _BLOCK),)](main_grad, grad, numel, BLOCK=_BLOCK)
    return main_grad


def accumulate_grad(main_grad: torch.Tensor, grad: torch.Tensor, graphed: bool) -> None:
    """``main_grad.add_(grad)``, by :func:`triton_accumulate_` where it applies (``graphed``: the
    step runs under CUDA graphs; CUDA tensors, Triton installed, and the kernel's layouts)."""
    if graphed and HAVE_TRITON and main_grad.is_cuda and _kernel_applies(main_grad, grad):
        triton_accumulate_(main_grad, grad)
    else:
        main_grad.add_(grad)
