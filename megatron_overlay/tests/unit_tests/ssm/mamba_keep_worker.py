# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Worker of ``test_mamba_keep_activations.py``: ``mamba_ssm``'s Triton kernels in Triton's
interpreter on the CPU, ``megatron.core.ssm.mamba_keep_activations`` against ``mamba_ssm``'s own
training functions.

Run as ``python mamba_keep_worker.py OUT.pt`` with ``TRITON_INTERPRET=1``,
``MAMBA_DETERMINISTIC=1`` (one configuration per autotuner, no timing runs) and ``mamba_ssm`` plus
a placeholder ``selective_scan_cuda`` module on ``PYTHONPATH`` (its package ``__init__`` imports
that Mamba-1 extension). Its kernel wrappers ask CUDA for the current device and the number of
multiprocessors; on a machine without CUDA this process answers for it. ``causal_conv1d`` is a
CUDA extension, so both split-convolution functions get the same PyTorch convolution in its place.

Saves, per case, the outputs and every input gradient of both implementations.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.nn.functional as F

# Kernel wrappers call these around launches; without CUDA there is nothing to select or query.
torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
    multi_processor_count=4
)

from mamba_ssm.ops.triton import ssd_combined  # noqa: E402  (after the CUDA stand-ins)

from megatron.core.ssm import mamba_keep_activations as keep  # noqa: E402

# (batch, seqlen, heads, headdim, groups, state, chunk_size, D per channel, packed sequences)
CASES = {
    "two_groups": (2, 40, 4, 8, 2, 16, 16, False, False),
    "one_group_D_per_channel": (1, 32, 2, 16, 1, 16, 16, True, False),
    "packed_sequences": (2, 48, 2, 8, 1, 16, 16, False, True),
}


def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    """causal_conv1d's ``causal_conv1d_fwd_function`` for ``x`` ``(b, d, s)``: depthwise causal
    convolution, optional SiLU, output in ``x``'s layout. With ``seq_idx`` (``(b, s)``) a tap
    reads only tokens of its own sequence, as the CUDA kernel does (no states)."""
    assert initial_states is None and final_states_out is None
    width = weight.shape[-1]
    # windows[..., t, k] = x[..., t - (width - 1) + k] (zero before the first token)
    windows = F.pad(x, (width - 1, 0)).unfold(-1, width, 1)
    if seq_idx is not None:
        own = F.pad(seq_idx, (width - 1, 0), value=-1).unfold(-1, width, 1)
        windows = windows * (own == seq_idx[..., None]).unsqueeze(1).to(x.dtype)
    y = (windows.float() * weight.float()[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.float()[:, None]
    y = y.to(x.dtype)
    out = torch.empty_like(x)
    out.copy_(F.silu(y) if silu else y)
    return out


def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dinit, silu):
    """causal_conv1d's ``causal_conv1d_bwd_function``: writes into ``dx`` when given."""
    assert initial_states is None and dfinal_states is None and not dinit
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight)]
        if bias is not None:
            leaves.append(bias.detach().requires_grad_())
        bias_leaf = leaves[2] if bias is not None else None
        out = conv_fwd(*leaves[:2], bias_leaf, seq_idx, None, None, silu)
        grads = torch.autograd.grad(out, leaves, dout)
    dx = torch.empty_like(x) if dx is None else dx
    dx.copy_(grads[0])
    dbias = grads[2].to(bias.dtype) if bias is not None else None
    return dx, grads[1].to(weight.dtype), dbias, None


for module in (ssd_combined, keep):
    module.causal_conv1d_fwd_function = conv_fwd
    module.causal_conv1d_bwd_function = conv_bwd


def _leaf(t):
    return t.detach().clone().requires_grad_()


def packed_seq_idx(batch: int, seqlen: int) -> torch.Tensor:
    """``(batch, seqlen)`` int32 sequence index: three sequences per row."""
    cuts = torch.tensor([seqlen // 3, seqlen // 2 + 5])
    seq_idx = (torch.arange(seqlen)[None, :, None] >= cuts).sum(-1).to(torch.int32)
    return seq_idx.expand(batch, -1).contiguous()


def scan_inputs(batch, seqlen, heads, headdim, groups, state, D_per_channel, packed, seed):
    """Inputs of the chunked scan (bfloat16 activations, float32 A / D / dt_bias)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return dict(
        x=randn(batch, seqlen, heads, headdim),
        dt=randn(batch, seqlen, heads, scale=0.5),
        A=-torch.rand(heads, generator=gen) * 2 - 0.5,
        B=randn(batch, seqlen, groups, state),
        C=randn(batch, seqlen, groups, state),
        D=(
            randn(heads, headdim, dtype=torch.float32)
            if D_per_channel
            else randn(heads, dtype=torch.float32)
        ),
        z=randn(batch, seqlen, heads, headdim),
        dt_bias=randn(heads, scale=0.5, dtype=torch.float32),
        seq_idx=packed_seq_idx(batch, seqlen) if packed else None,
        dout=randn(batch, seqlen, heads, headdim),
    )


def run_scan(fn, inputs, chunk_size):
    """Output and input gradients of ``fn`` (``mamba_chunk_scan_combined`` signature)."""
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    leaves = {n: _leaf(inputs[n]) for n in names}
    out = fn(
        leaves["x"],
        leaves["dt"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        chunk_size,
        D=leaves["D"],
        z=leaves["z"],
        dt_bias=leaves["dt_bias"],
        seq_idx=inputs["seq_idx"],
    )
    out.backward(inputs["dout"])
    return {"out": out.detach(), **{f"d{n}": leaves[n].grad for n in names}}


def reference_scan(x, dt, A, B, C, chunk_size, **kwargs):
    """mamba_ssm's function with the dt handling MambaMixer uses."""
    return ssd_combined.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, dt_softplus=True, **kwargs
    )


def split_inputs(batch, seqlen, heads, headdim, groups, state, D_per_channel, packed, seed):
    """Inputs of the split-convolution function: in_proj output, convolution, dt_bias, A, D."""
    gen = torch.Generator().manual_seed(seed)
    d_inner = heads * headdim
    conv_channels = d_inner + 2 * groups * state
    width = 4
    return dict(
        zxbcdt=(
            torch.randn(batch, seqlen, 2 * d_inner + 2 * groups * state + heads, generator=gen)
        ).bfloat16(),
        conv1d_weight=(torch.randn(conv_channels, width, generator=gen) * 0.5).bfloat16(),
        conv1d_bias=(torch.randn(conv_channels, generator=gen) * 0.1).bfloat16(),
        dt_bias=torch.randn(heads, generator=gen) * 0.5,
        A=-torch.rand(heads, generator=gen) * 2 - 0.5,
        D=(
            torch.randn(heads, headdim, generator=gen)
            if D_per_channel
            else torch.randn(heads, generator=gen)
        ),
        dout=torch.randn(batch, seqlen, d_inner, generator=gen).bfloat16(),
        seq_idx=packed_seq_idx(batch, seqlen) if packed else None,
    )


def run_split(fn, inputs, chunk_size, headdim, groups):
    """Output and input gradients of a split-convolution function."""
    names = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D")
    leaves = {n: _leaf(inputs[n]) for n in names}
    out = fn(
        leaves["zxbcdt"],
        leaves["conv1d_weight"],
        leaves["conv1d_bias"],
        leaves["dt_bias"],
        leaves["A"],
        leaves["D"],
        chunk_size,
        seq_idx=inputs["seq_idx"],
        headdim=None if leaves["D"].dim() == 2 else headdim,
        ngroups=groups,
    )
    out.backward(inputs["dout"])
    return {"out": out.detach(), **{f"d{n}": leaves[n].grad for n in names}}


def keep_split(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx, headdim, ngroups
):
    """The keeping function past its CUDA-only entry check."""
    # pylint: disable=protected-access
    return keep._SplitConv1dScanKeepFn.apply(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        seq_idx,
        keep.NO_DT_LIMIT,
        "silu",
        headdim,
        ngroups,
    )


def reference_split(
    zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx, headdim, ngroups
):
    """mamba_ssm's function as MambaMixer calls it."""
    return ssd_combined.mamba_split_conv1d_scan_combined(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        seq_idx=seq_idx,
        activation="silu",
        headdim=headdim,
        ngroups=ngroups,
    )


def main(out_path: str) -> None:
    """Run every case with both implementations; save the results."""
    # pylint: disable=protected-access
    results = {
        "missing_keywords": keep.missing_keywords({n: getattr(keep, n) for n in keep._KEYWORDS})
    }
    for name, (b, l, h, p, g, n, chunk, D_per_channel, packed) in CASES.items():
        scan = scan_inputs(b, l, h, p, g, n, D_per_channel, packed, seed=len(results) - 1)
        results[f"scan/{name}"] = {
            "keep": run_scan(keep.mamba_chunk_scan_keep, scan, chunk),
            "mamba_ssm": run_scan(reference_scan, scan, chunk),
        }
        split = split_inputs(b, l, h, p, g, n, D_per_channel, packed, seed=len(results) - 1)
        results[f"split/{name}"] = {
            "keep": run_split(keep_split, split, chunk, p, g),
            "mamba_ssm": run_split(reference_split, split, chunk, p, g),
        }
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
