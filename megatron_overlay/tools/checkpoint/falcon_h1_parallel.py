# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Falcon-H1 parallel layout: what a TP / PP split of the model may be, and where layers go.

Tensor parallelism: which sizes must divide (:func:`check_tensor_parallel`) and the padded
vocabulary (:func:`padded_vocab_size`). Pipeline parallelism: layers per stage
(:func:`pipeline_layer_counts`), the ``--hybrid-layer-pattern`` of parallel hybrid ``P`` layers
with ``|`` between stages and back (:func:`hybrid_layer_pattern`, :func:`pattern_layer_counts`),
and the global index of each stage's first layer (:func:`stage_offsets`).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

from conversion_io import ConversionError
from falcon_h1_layouts import FalconH1Dims


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def check_tensor_parallel(dims: FalconH1Dims, tp: int) -> None:
    """Raise :class:`ConversionError` if ``dims`` cannot be split ``tp`` ways exactly.

    TP must divide the attention heads, Mamba heads and FFN size. The KV heads and the Mamba
    groups may also be fewer than TP ranks when TP is a multiple of them: every component is
    split evenly over the ranks all the same (a rank then holds a slice of one query group's
    fused QKV rows, or of one Mamba group's B / C rows, which Megatron gathers at run time), so
    ``d_state`` must split evenly over the ranks sharing a group.
    """
    if tp < 1:
        raise ConversionError(f"tensor parallel size must be >= 1, got {tp}")
    checks = [
        ("num_attention_heads", dims.heads),
        ("mamba_n_heads", dims.mamba_heads),
        ("intermediate_size", dims.ffn),
    ]
    bad = [f"{name}={value}" for name, value in checks if value % tp]
    for name, value in (
        ("num_key_value_heads (query groups)", dims.kv_heads),
        ("mamba_n_groups", dims.mamba_groups),
    ):
        if value % tp and tp % value:
            bad.append(f"{name}={value} (nor is TP a multiple of it)")
    if bad:
        raise ConversionError(f"TP={tp} does not divide {', '.join(bad)}.")
    if dims.mamba_groups < tp and dims.d_state % (tp // dims.mamba_groups):
        raise ConversionError(
            f"TP={tp} shares each of the {dims.mamba_groups} Mamba group(s) between "
            f"{tp // dims.mamba_groups} ranks, which split its mamba_d_state={dims.d_state} "
            "B / C rows evenly; it must be divisible by that number."
        )


def pipeline_layer_counts(
    num_layers: int, pp: int, layers_per_stage: Optional[Sequence[int]] = None
) -> List[int]:
    """Layers of each pipeline stage: ``layers_per_stage`` if given, else an even split."""
    if pp < 1:
        raise ConversionError(f"pipeline parallel size must be >= 1, got {pp}")
    if layers_per_stage is not None:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
            raise ConversionError(
                f"pipeline layer split {counts} must have {pp} positive entries summing to "
                f"{num_layers}"
            )
        return counts
    if num_layers % pp:
        raise ConversionError(
            f"PP={pp} does not divide num_hidden_layers={num_layers}; give the layers per "
            "stage explicitly (--target-pp-layers)"
        )
    return [num_layers // pp] * pp


def hybrid_layer_pattern(counts: Sequence[int]) -> str:
    """Megatron ``--hybrid-layer-pattern`` of parallel hybrid layers, ``|`` between stages."""
    return "|".join("P" * c for c in counts)


def pattern_layer_counts(pattern: str, pp: int) -> List[int]:
    """Layers per pipeline stage of a ``P``-only hybrid layer pattern (``|`` splits stages)."""
    main = pattern.split("/")[0]
    if set(main) - {"P", "|"}:
        raise ConversionError(
            f"hybrid_layer_pattern {pattern!r} is not a Falcon-H1 stack (only 'P' layers)"
        )
    if "/" in pattern:
        raise ConversionError("multi-token-prediction layers are not part of Falcon-H1")
    segments = main.split("|")
    if len(segments) == 1:
        return pipeline_layer_counts(len(main), pp)
    if len(segments) != pp:
        raise ConversionError(
            f"hybrid_layer_pattern has {len(segments)} pipeline segments but the checkpoint "
            f"has PP={pp} (virtual pipelines are not supported)"
        )
    return [len(s) for s in segments]


def stage_offsets(counts: Sequence[int]) -> List[int]:
    """Global index of the first layer of each pipeline stage."""
    offsets, total = [], 0
    for c in counts:
        offsets.append(total)
        total += c
    return offsets
