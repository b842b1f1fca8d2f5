# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Mamba-2 ops for ``MambaMixer``: the CUDA kernels where they can run, PyTorch elsewhere.

Each function here has the signature of the ``mamba_ssm`` / ``causal_conv1d`` op it stands for
and decides per call: CUDA tensors use the installed kernels; CPU tensors, or machines without
``mamba_ssm`` / ``causal_conv1d``, use :mod:`megatron.core.ssm.mamba2_torch` (forward and
backward through autograd). Setting ``MEGATRON_MAMBA_TORCH_OPS=1`` forces the PyTorch ops
everywhere (debugging, kernel comparisons).
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from megatron.core.ssm import mamba2_torch

try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _kernel_rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_chunk_scan
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_split_conv1d_scan_combined as _kernel_split_scan,
    )

    HAVE_MAMBA_SSM_KERNELS = True
except ImportError:
    _kernel_rmsnorm_fn = _kernel_chunk_scan = _kernel_split_scan = None
    HAVE_MAMBA_SSM_KERNELS = False

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv1d

    HAVE_CAUSAL_CONV1D_KERNELS = True
except ImportError:
    _kernel_conv1d = None
    HAVE_CAUSAL_CONV1D_KERNELS = False

FORCE_TORCH_ENV = "MEGATRON_MAMBA_TORCH_OPS"

_KERNEL_TAKES_STATE_DTYPE = HAVE_MAMBA_SSM_KERNELS and all(
    "state_dtype" in inspect.signature(fn).parameters
    for fn in (_kernel_chunk_scan, _kernel_split_scan)
)


def _kernels_for(tensor: torch.Tensor, available: bool) -> bool:
    return available and tensor.is_cuda and os.environ.get(FORCE_TORCH_ENV, "0") != "1"


def _state_dtype_kwargs(state_dtype: Optional[torch.dtype], tensor: torch.Tensor) -> dict:
    """``state_dtype`` for the kernel; kernels without the argument keep states in the input
    dtype, which is what MambaMixer asks for unless mamba_training_ssm_states_dtype is set."""
    if state_dtype is None:
        return {}
    if _KERNEL_TAKES_STATE_DTYPE:
        return {"state_dtype": state_dtype}
    if state_dtype == tensor.dtype:
        return {}
    raise RuntimeError(
        f"mamba_training_ssm_states_dtype={state_dtype} needs a mamba_ssm whose kernels accept "
        "`state_dtype`; the installed one does not. Upgrade mamba_ssm or unset the option."
    )


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, *args, state_dtype: Optional[torch.dtype] = None, **kwargs
):
    """``mamba_ssm``'s ``mamba_chunk_scan_combined`` (kernel on CUDA, PyTorch otherwise)."""
    if _kernels_for(x, HAVE_MAMBA_SSM_KERNELS):
        kwargs.update(_state_dtype_kwargs(state_dtype, x))
        return _kernel_chunk_scan(x, dt, A, B, C, chunk_size, *args, **kwargs)
    return mamba2_torch.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, *args, **kwargs)


def mamba_split_conv1d_scan_combined(
    zxbcdt, *args, state_dtype: Optional[torch.dtype] = None, **kwargs
):
    """``mamba_ssm``'s fused split/conv/scan path (kernel on CUDA, PyTorch otherwise)."""
    if _kernels_for(zxbcdt, HAVE_MAMBA_SSM_KERNELS):
        kwargs.update(_state_dtype_kwargs(state_dtype, zxbcdt))
        return _kernel_split_scan(zxbcdt, *args, **kwargs)
    return mamba2_torch.mamba_split_conv1d_scan_combined(zxbcdt, *args, **kwargs)


def _hide_state_dtype(fn):
    """Drop ``state_dtype`` from ``fn``'s advertised signature.

    ``MambaMixer`` inspects the signature to decide whether the installed ops take
    ``state_dtype`` (``MAMBA_HAS_STATE_DTYPE``).  With kernels that do not, the mixer must see
    what it would see with those kernels imported directly: then it passes no ``state_dtype``
    (states stay in the input dtype) and rejects ``mamba_training_ssm_states_dtype`` at
    construction with its own message, instead of failing on the first forward whenever
    ``params_dtype`` differs from the activations' dtype.
    """
    sig = inspect.signature(fn)
    fn.__signature__ = sig.replace(
        parameters=[p for p in sig.parameters.values() if p.name != "state_dtype"]
    )
    return fn


if HAVE_MAMBA_SSM_KERNELS and not _KERNEL_TAKES_STATE_DTYPE:
    _hide_state_dtype(mamba_chunk_scan_combined)
    _hide_state_dtype(mamba_split_conv1d_scan_combined)


def causal_conv1d_fn(x, weight, bias=None, *args, **kwargs):
    """``causal_conv1d``'s ``causal_conv1d_fn`` (kernel on CUDA, PyTorch otherwise)."""
    if _kernels_for(x, HAVE_CAUSAL_CONV1D_KERNELS):
        return _kernel_conv1d(x, weight, bias, *args, **kwargs)
    return mamba2_torch.causal_conv1d_fn(x, weight, bias, *args, **kwargs)


class RMSNormGated(mamba2_torch.RMSNormGated):
    """Gated group RMSNorm with ``mamba_ssm``'s constructor and parameter names."""

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x`` (gated by ``z``) with the Triton kernel on CUDA, PyTorch otherwise
        (and for a group shared across ranks, whose sum of squares the kernel cannot complete).
        """
        if self.group_sum is None and _kernels_for(x, HAVE_MAMBA_SSM_KERNELS):
            return _kernel_rmsnorm_fn(
                x,
                self.weight,
                self.bias,
                z=z,
                eps=self.eps,
                group_size=self.group_size,
                norm_before_gate=self.norm_before_gate,
            )
        return super().forward(x, z)
