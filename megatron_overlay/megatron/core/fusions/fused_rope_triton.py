# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Rotary position embedding in one Triton kernel, for RoPE fusion (``apply_rope_fusion``, on by
default; ``--no-rope-fusion`` turns it off) without Transformer Engine, whose fused RoPE Megatron
uses when it is installed.

Computes what ``rope_utils._apply_rotary_pos_emb_bshd`` computes for the non-interleaved layout,
``out = t * cos(freqs) + rotate_half(t) * sin(freqs)`` on the first ``freqs.shape[-1]`` channels
of each head (the rest pass through), with

    out[:h] = t[:h] * cos(f[:h]) - t[h:] * sin(f[:h])
    out[h:] = t[h:] * cos(f[h:]) + t[:h] * sin(f[h:])        (h: half the rotary channels)

in float32 and one rounding to the input's dtype per element. The unfused form launches about a
dozen kernels per call (cos, sin, their casts, products, the rotate-half negation and
concatenations; as many again backward) and rounds every intermediate to the input dtype. The
backward applies the transposed rotation to the output gradient in the same kernel. One program
per (position, sample) handles all heads of it; cos and sin are computed once per position.
Needs CUDA tensors, or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron.core.fusions.triton_support import runs_triton


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    freqs_ptr,
    batch,
    heads,
    stride_xs,
    stride_xb,
    stride_xh,
    stride_fs,
    dim,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate all heads of one (position, sample); BACKWARD applies the transposed rotation."""
    pid = tl.program_id(0).to(tl.int64)
    pos = pid // batch
    sample = pid % batch
    cols = tl.arange(0, BLOCK_HALF)
    in_half = cols < HALF
    f_first = tl.load(freqs_ptr + pos * stride_fs + cols, mask=in_half, other=0.0).to(tl.float32)
    f_second = tl.load(freqs_ptr + pos * stride_fs + HALF + cols, mask=in_half, other=0.0)
    f_second = f_second.to(tl.float32)
    cos_first, sin_first = tl.cos(f_first), tl.sin(f_first)
    cos_second, sin_second = tl.cos(f_second), tl.sin(f_second)

    rows = tl.arange(0, BLOCK_H)
    in_heads = rows < heads
    mask = in_heads[:, None] & in_half[None, :]
    x_row = x_ptr + pos * stride_xs + sample * stride_xb + rows[:, None] * stride_xh
    out_row = out_ptr + (pid * heads + rows[:, None]) * dim  # output: contiguous [s, b, n, d]
    x1 = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * cos_first[None, :] + x2 * sin_second[None, :]
        o2 = x2 * cos_second[None, :] - x1 * sin_first[None, :]
    else:
        o1 = x1 * cos_first[None, :] - x2 * sin_first[None, :]
        o2 = x2 * cos_second[None, :] + x1 * sin_second[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_row + cols[None, :], o1.to(out_ty), mask=mask)
    tl.store(out_row + HALF + cols[None, :], o2.to(out_ty), mask=mask)
    if BLOCK_PASS > 0:  # channels beyond the rotary ones pass through
        pass_cols = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = in_heads[:, None] & (pass_cols < dim)[None, :]
        rest = tl.load(x_row + pass_cols[None, :], mask=pass_mask, other=0.0)
        tl.store(out_row + pass_cols[None, :], rest.to(out_ty), mask=pass_mask)


def triton_rope_applies(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool) -> bool:
    """True where :func:`triton_apply_rotary_pos_emb` computes the unfused bshd RoPE: a 4-D
    ``t`` on CUDA (or under the interpreter), non-interleaved, one frequency row per position
    shared by every sample and head, an even number of rotary channels."""
    rot_dim = freqs.shape[-1]
    return (
        runs_triton(t)
        and not rotary_interleaved
        and t.dim() == 4
        and freqs.dim() == 4
        and freqs.shape[0] == t.shape[0]
        and freqs.shape[1] == 1
        and freqs.shape[2] == 1
        and rot_dim % 2 == 0
        and 0 < rot_dim <= t.shape[-1]
        and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def _rope(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    seq, batch, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    freqs = freqs.reshape(seq, freqs.shape[-1])
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    half = freqs.shape[-1] // 2
    out = torch.empty((seq, batch, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    pass_channels = dim - 2 * half
    _rope_kernel[(seq * batch,)](
        x,
        out,
        freqs,
        batch,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        freqs.stride(0),
        dim,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(pass_channels) if pass_channels else 0,
        BACKWARD=backward,
    )
    return out


class _TritonRotaryPosEmb(torch.autograd.Function):
    """RoPE forward and backward in one Triton kernel each."""

    @staticmethod
    def forward(ctx, t, freqs):
        """``t`` [s, b, n, d] rotated by ``freqs`` [s, 1, 1, rot_dim]."""
        ctx.save_for_backward(freqs)
        return _rope(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad_output):
        """The output gradient rotated back (the transposed rotation)."""
        (freqs,) = ctx.saved_tensors
        return _rope(grad_output, freqs, backward=True), None


def triton_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``t`` ([seq, batch, heads, dim], any strides but a unit
    last one) by ``freqs`` ([seq, 1, 1, rot_dim] angles, float32); returns a new contiguous
    tensor of ``t``'s dtype. See :func:`triton_rope_applies` for what it supports."""
    if not triton_rope_applies(t, freqs, rotary_interleaved=False):
        raise ValueError(
            "triton_apply_rotary_pos_emb: needs a 4-D CUDA tensor (or TRITON_INTERPRET=1), "
            f"freqs [seq, 1, 1, even rot_dim <= dim]; got t {tuple(t.shape)} on {t.device}, "
            f"freqs {tuple(freqs.shape)}"
        )
    return _TritonRotaryPosEmb.apply(t, freqs)
