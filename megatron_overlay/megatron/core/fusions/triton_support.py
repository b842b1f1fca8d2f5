# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Where the Triton fusions of this directory can run: on CUDA tensors, or on any tensor in
Triton's CPU interpreter (``TRITON_INTERPRET=1`` when triton was first imported; tests)."""

from __future__ import annotations

import os

import torch
import triton

try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.3
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when Triton kernels can take ``tensor``: a CUDA tensor, or the interpreter."""
    return tensor.is_cuda or INTERPRET
