# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Vocab-parallel cross entropy in two Triton passes (``--cross-entropy-fusion-impl triton``).

Same result as :func:`megatron.core.tensor_parallel.vocab_parallel_cross_entropy` (the loss of
each token over the whole vocabulary, whose logits are split over the tensor-parallel ranks;
a target outside this rank's vocabulary range contributes no predicted logit here), computed
without the float32 copies of the logits that the unfused path makes:

* forward: one kernel reads each row of logits (any float dtype) once and keeps, in float32,
  the running maximum ``m``, the sum of ``exp(x - m)`` (rescaled whenever the maximum grows)
  and the target's logit; with several ranks, the per-row maxima are MAX-reduced and the
  rescaled sums and target logits SUM-reduced (one all-reduce each, on vectors of one value
  per token). ``loss = m + log(sum) - target_logit``. Saved for the backward: the logits
  themselves, ``m`` and ``log(sum)`` per row (kept apart: ``exp((x - m) - log(sum))`` is as
  accurate as a softmax computed from ``x - m``, where a rounded ``m + log(sum)`` would lose
  precision when the logits are large).
* backward: one kernel reads each row again and writes
  ``grad = (exp((x - m) - log(sum)) - onehot(target)) * grad_output`` in the dtype of the
  logits (computed in float32, rounded once to the nearest value).

So the logits are read twice and their gradient written once, where the unfused path casts
them to float32, and runs max, subtract, exp, sum, divide, multiply and a cast back as separate
passes over float32 copies. Nothing is read back to the host, so the function can be captured
in a CUDA graph. Needs CUDA tensors, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for
tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron.core.fusions.triton_support import runs_triton

# Columns per loop iteration of a program (one program per row of logits). The interpreter runs
# a block as one NumPy operation, so its block size only changes how often the online maximum
# is rescaled; tests pass smaller blocks to cover several iterations.
_BLOCK_SIZE = 4096
_NUM_WARPS = 8


@triton.jit
def _round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 value (ties to even), still as float32.

    The GPU's conversion rounds so too; Triton's CPU interpreter truncates, so the kernels
    round first and every conversion after this one is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    vocab_start,
    BLOCK_SIZE: tl.constexpr,
):
    """Per row: running max, sum of exp(x - max) and the target's logit (0 if not here)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    row_max = float("-inf")
    sum_exp = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
    local_target = tl.load(target_ptr + row) - vocab_start
    here = (local_target >= 0) & (local_target < n_cols)
    safe_target = tl.where(here, local_target, 0)
    target_logit = tl.load(row_ptr + safe_target, mask=here, other=0.0).to(tl.float32)
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + n_rows + row, sum_exp)
    tl.store(stats_ptr + 2 * n_rows + row, tl.where(here, target_logit, 0.0))


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    target_ptr,
    row_max_ptr,
    log_sum_exp_ptr,
    grad_output_ptr,
    n_cols,
    vocab_start,
    BLOCK_SIZE: tl.constexpr,
):
    """Per row: grad = (softmax(x) - onehot(target)) * grad_output, in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_ptr + row * n_cols
    row_max = tl.load(row_max_ptr + row)
    log_sum_exp = tl.load(log_sum_exp_ptr + row)
    scale = tl.load(grad_output_ptr + row)
    local_target = tl.load(target_ptr + row) - vocab_start
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        in_row = cols < n_cols
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        prob = tl.exp((x - row_max) - log_sum_exp)
        grad = (prob - tl.where(cols == local_target, 1.0, 0.0)) * scale
        if grad_ptr.dtype.element_ty == tl.bfloat16:
            grad = _round_to_bfloat16(grad)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _check_device(tensor: torch.Tensor) -> None:
    if not runs_triton(tensor):
        raise RuntimeError(
            "--cross-entropy-fusion-impl triton needs CUDA tensors (or TRITON_INTERPRET=1, "
            f"Triton's CPU interpreter, set before triton is imported); got logits on "
            f"{tensor.device}. Use --cross-entropy-fusion-impl native on this device."
        )


def _group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        if dist.is_available() and dist.is_initialized():
            raise ValueError("triton_vocab_parallel_cross_entropy: pass the tensor-parallel group")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _TritonVocabParallelCrossEntropy(torch.autograd.Function):
    """Loss per token from vocab-parallel logits; see the module docstring."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group, block_size):
        """Loss of shape ``target.shape`` (float32)."""
        _check_device(vocab_parallel_logits)
        if vocab_parallel_logits.shape[:-1] != target.shape:
            raise ValueError(
                f"logits {tuple(vocab_parallel_logits.shape)} and target {tuple(target.shape)} "
                "must agree in every dimension but the last (vocabulary)"
            )
        n_cols = vocab_parallel_logits.shape[-1]
        logits = vocab_parallel_logits.reshape(-1, n_cols)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n_rows = logits.shape[0]
        target_1d = target.reshape(-1).to(torch.int64).contiguous()
        rank, world_size = _group_rank_and_size(tp_group)
        vocab_start = rank * n_cols

        stats = torch.empty((3, n_rows), dtype=torch.float32, device=logits.device)
        if n_rows > 0:
            _cross_entropy_fwd_kernel[(n_rows,)](
                logits,
                logits.stride(0),
                target_1d,
                stats,
                n_rows,
                n_cols,
                vocab_start,
                BLOCK_SIZE=block_size,
                num_warps=_NUM_WARPS,
            )
        row_max, sum_exp, target_logit = stats[0], stats[1], stats[2]
        if world_size > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack((sum_exp * torch.exp(row_max - global_max), target_logit))
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
            row_max, sum_exp, target_logit = global_max, sums[0], sums[1]
        log_sum_exp = torch.log(sum_exp)
        loss = (row_max + log_sum_exp) - target_logit

        ctx.save_for_backward(logits, target_1d, row_max, log_sum_exp)
        ctx.vocab_start = vocab_start
        ctx.block_size = block_size
        ctx.logits_shape = vocab_parallel_logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        """Gradient of the logits, in their dtype."""
        logits, target_1d, row_max, log_sum_exp = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        grad_rows = grad_output.reshape(-1).to(torch.float32).contiguous()
        grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
        if n_rows > 0:
            _cross_entropy_bwd_kernel[(n_rows,)](
                logits,
                logits.stride(0),
                grad,
                target_1d,
                row_max,
                log_sum_exp,
                grad_rows,
                n_cols,
                ctx.vocab_start,
                BLOCK_SIZE=ctx.block_size,
                num_warps=_NUM_WARPS,
            )
        return grad.view(ctx.logits_shape), None, None, None


def triton_vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross entropy of logits split over the vocabulary, in two Triton passes.

    Args:
        vocab_parallel_logits: ``[..., vocab / tp]`` logits of this rank's vocabulary range
            (``rank * vocab/tp`` to ``(rank + 1) * vocab/tp``), any float dtype.
        target: ``[...]`` token ids over the whole vocabulary.
        tp_group: the tensor-parallel group the vocabulary is split over (None: no split, only
            without an initialised process group).
        block_size: columns per loop iteration (a power of two; default 4096, at most the
            vocabulary padded to a power of two).

    Returns:
        float32 loss per token, shaped like ``target``.
    """
    n_cols = vocab_parallel_logits.shape[-1]
    if block_size is None:
        block_size = min(_BLOCK_SIZE, triton.next_power_of_2(max(n_cols, 1)))
    elif block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return _TritonVocabParallelCrossEntropy.apply(
        vocab_parallel_logits, target, tp_group, block_size
    )
