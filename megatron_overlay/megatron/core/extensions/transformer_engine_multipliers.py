# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Transformer Engine linears applying Falcon-H1's forward multipliers.

The TE counterparts of ``ColumnParallelLinearWithMultipliers`` /
``RowParallelLinearWithMultipliers`` (``megatron.core.transformer.forward_multipliers``): same
constructor as the TE wrapper plus ``role``.

Where it is cheaper (more tokens than the larger side of the weight: training micro-batches),
the scale is folded into the weight rows TE's GEMM reads (``x (s W)^T``): one weight-sized
elementwise pass forward and one backward instead of activation-sized ones, and no broadcast
kernel over the activations. TE then returns the gradient of the scaled weight and autograd
scales it back onto the parameter. Folding needs TE to differentiate the weight it is given,
so it is not used with TE's fused weight-gradient accumulation (``gradient_accumulation_fusion``
writes into the parameter's ``main_grad``), delayed weight gradients, FP8/FP4 weights or a
bias; then the scale multiplies the output (column) or the smaller of input and output (row).
Importing this module needs Transformer Engine.
"""

from __future__ import annotations

import contextlib
from typing import List

import torch

from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
from megatron.core.transformer.forward_multipliers import ForwardMultipliers
from megatron.core.utils import get_pg_rank


def _can_fold(linear, fm: ForwardMultipliers, x: torch.Tensor, largest_side: int) -> bool:
    """True when ``linear`` (a TE linear) should fold ``fm`` into its weight for input ``x``."""
    config = linear.config
    tokens = x.numel() // max(x.shape[-1], 1)
    return (
        not fm.identity
        and tokens > largest_side
        and not linear.fuse_wgrad_accumulation
        and not linear.use_bias
        and not config.delay_wgrad_compute
        and config.fp8 is None
        and config.fp4 is None
        and len(linear.weight_names) == 1
        and type(linear.weight) is torch.nn.Parameter  # not a TE quantized tensor
    )


# Both TE linears below fold the same way. Helpers, not a mixin: without Transformer Engine
# installed, upstream defines the TE classes on a mock base whose metaclass a plain mixin
# class conflicts with.
@contextlib.contextmanager
def _folding(linear):
    """While active, ``linear``'s ``_get_weight_tensors`` returns the scaled weight."""
    linear._fold_into_weight = True
    try:
        yield
    finally:
        linear._fold_into_weight = False


def _weights_to_use(linear, weights: List[torch.Tensor]) -> List[torch.Tensor]:
    """TE's ``weights``, with the multipliers folded into the rows while folding."""
    if linear._fold_into_weight:
        return [linear.forward_multipliers.scale_weight(weights[0])]
    return weights


class TEColumnParallelLinearWithMultipliers(TEColumnParallelLinear):
    """``TEColumnParallelLinear`` applying the forward multipliers of its ``role``."""

    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_multipliers = ForwardMultipliers(
            self.config, role, self.out_features, self.tp_size, tp_rank=get_pg_rank(self._tp_group)
        )
        self._fold_into_weight = False

    def _get_weight_tensors(self) -> List[torch.Tensor]:
        """TE's weights, scaled while a folding forward runs."""
        return _weights_to_use(self, super()._get_weight_tensors())

    def forward(self, x):
        """Forward of the parent with the role's multipliers applied."""
        fm = self.forward_multipliers
        if fm.identity:
            return super().forward(x)
        if _can_fold(self, fm, x, self.in_features):
            with _folding(self):
                return super().forward(x)
        output, bias = super().forward(x)
        return fm.scale_output(output), fm.scale_output(bias)


class TERowParallelLinearWithMultipliers(TERowParallelLinear):
    """``TERowParallelLinear`` applying the forward multipliers of its ``role``."""

    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_multipliers = ForwardMultipliers(
            self.config, role, self.out_features, self.tp_size
        )
        if self.forward_multipliers.output_vector is not None:
            raise ValueError(f"row-parallel role {role!r} has per-channel multipliers")
        self._fold_into_weight = False

    def _get_weight_tensors(self) -> List[torch.Tensor]:
        """TE's weights, scaled while a folding forward runs."""
        return _weights_to_use(self, super()._get_weight_tensors())

    def forward(self, x):
        """Forward of the parent with the role's multipliers applied."""
        fm = self.forward_multipliers
        if fm.identity:
            return super().forward(x)
        if _can_fold(self, fm, x, max(self.in_features, self.out_features)):
            with _folding(self):
                return super().forward(x)
        if not self.use_bias and x.shape[-1] < self.out_features:
            return super().forward(x * fm.combined)
        output, bias = super().forward(x)
        return fm.scale_output(output), fm.scale_output(bias)
