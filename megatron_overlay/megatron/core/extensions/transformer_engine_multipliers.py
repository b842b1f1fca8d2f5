# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Transformer Engine linears applying Falcon-H1's forward multipliers.

The TE counterparts of ``ColumnParallelLinearWithMultipliers`` /
``RowParallelLinearWithMultipliers`` (``megatron.core.transformer.forward_multipliers``): same
constructor as the TE wrapper plus ``role``. TE owns the weight and its GEMM, so the scale
multiplies the output (column) or the smaller of input and output (row: one scale for every
channel). Importing this module needs Transformer Engine.
"""

from __future__ import annotations

from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
from megatron.core.transformer.forward_multipliers import ForwardMultipliers
from megatron.core.utils import get_pg_rank


class TEColumnParallelLinearWithMultipliers(TEColumnParallelLinear):
    """``TEColumnParallelLinear`` applying the forward multipliers of its ``role``."""

    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_multipliers = ForwardMultipliers(
            self.config, role, self.out_features, self.tp_size, tp_rank=get_pg_rank(self._tp_group)
        )

    def forward(self, x):
        """Forward of the parent with the role's multipliers applied to the output."""
        output, bias = super().forward(x)
        fm = self.forward_multipliers
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

    def forward(self, x):
        """Forward of the parent with the role's multipliers applied (on the smaller side)."""
        fm = self.forward_multipliers
        if fm.identity:
            return super().forward(x)
        if not self.use_bias and x.shape[-1] < self.out_features:
            return super().forward(x * fm.combined)
        output, bias = super().forward(x)
        return fm.scale_output(output), fm.scale_output(bias)
