# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Gradient-norm and clipping kernels that keep their values on the device, for CUDA graphs
without Transformer Engine or Apex.

Without TE or Apex, gradient clipping (``megatron.core.optimizer.clip_grads``) uses Megatron's
local fallbacks: ``local_multi_tensor_l2_norm`` reduces the per-tensor norms on the host, the
total norm is read with ``.item()`` and the clipping scale is a Python float. Each read
synchronises with the GPU and none of them can be captured, so ``--optimizer-cuda-graph``
failed there. While a CUDA graph captures (:func:`stream_capturing`), clipping uses the
functions below instead, the way it uses TE's ``multi_tensor_l2norm`` and
``multi_tensor_scale_tensor``: the norm and the scale stay tensors on the device. Outside
capture nothing changes: the host-reading fallbacks keep their bits.

Numerics of the captured step: the per-tensor norms come from PyTorch's multi-tensor norm and
their norm is taken on the device in float32 (float64 for float64 inputs), the clipping
coefficient is computed in float32. The host path takes the per-tensor norms one by one,
reduces them on the host and computes the coefficient in float64, so the two can differ in the
last bits of the norm and of the coefficient (within a relative 1e-6 on the tests' float32
gradients); a coefficient >= 1 leaves the gradients unchanged in both.
"""

from functools import reduce
from typing import List, Sequence

import torch


def stream_capturing() -> bool:
    """True while the current CUDA stream captures a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def multi_tensor_l2_norm_on_device(
    chunk_size: int,
    noop_flag: torch.Tensor,
    tensor_lists: Sequence[Sequence[torch.Tensor]],
    per_tensor: bool,
    *args,
):
    """Drop-in for ``multi_tensor_l2norm`` (as ``local_multi_tensor_l2_norm``) that reads
    nothing on the host: the l2 norm of all tensors of all lists, a float32 (float64 for float64
    inputs) tensor of shape [1] on the tensors' device, and ``None`` (no per-tensor norms)."""
    norms: List[torch.Tensor] = [
        norm
        for tensor_list in tensor_lists
        if tensor_list
        for norm in torch._foreach_norm(tensor_list)
    ]
    if not norms:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    dtype = reduce(torch.promote_types, (norm.dtype for norm in norms), torch.float32)
    total = torch.linalg.vector_norm(torch.stack([norm.to(dtype) for norm in norms]))
    return total.reshape(1), None


def multi_tensor_scale_by_tensor(
    chunk_size: int,
    noop_flag: torch.Tensor,
    tensor_lists: Sequence[Sequence[torch.Tensor]],
    scale: torch.Tensor,
) -> None:
    """Drop-in for TE's ``multi_tensor_scale_tensor``: ``dst = src * scale`` for each pair of
    ``tensor_lists = [srcs, dsts]``, with ``scale`` a one-element floating-point device tensor
    (never read on the host). Each product is computed in the wider of the tensor's and the
    scale's dtype and rounded once to the tensor's dtype, as ``local_multi_tensor_scale``
    computes it with a Python float, on every device (not via a same-device scalar tensor, which
    elementwise kernels may first cast to a bfloat16 operand's dtype). In place (``srcs`` are
    ``dsts``), tensors of the scale's dtype take one multi-tensor multiply."""
    srcs, dsts = tensor_lists[0], tensor_lists[1]
    if len(srcs) != len(dsts):
        raise ValueError(f"{len(srcs)} source tensors for {len(dsts)} destinations")
    scale = scale.reshape(())
    in_place = all(src is dst for src, dst in zip(srcs, dsts))
    if in_place and all(dst.dtype == scale.dtype for dst in dsts):
        if dsts:
            torch._foreach_mul_(list(dsts), scale)
        return
    for src, dst in zip(srcs, dsts):
        dst.copy_(src.to(torch.promote_types(src.dtype, scale.dtype)) * scale)
