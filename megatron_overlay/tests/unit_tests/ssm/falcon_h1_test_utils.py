# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Tiny Falcon-H1 settings shared by the CPU tests of the parallel hybrid ('P') layer and of
batch-first Mamba training: the model config, written once, and the forward multipliers
(``falcon_h1_multipliers``)."""

import torch

from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.ssm.falcon_h1_multipliers import MULTIPLIERS  # noqa: F401 (re-exported)


def tiny_hybrid_config(**overrides):
    """A two-layer hybrid TransformerConfig (attention, SwiGLU MLP and Mamba-2, local
    implementation, CPU initialisation, no dropout or fusions); ``overrides`` replace fields."""
    values = dict(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=12,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        is_hybrid_model=True,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_num_groups=2,
        mamba_state_dim=8,
        mamba_chunk_size=4,
        use_cpu_initialization=True,
        transformer_impl="local",
    )
    values.update(overrides)
    return TransformerConfig(**values)


def tiny_hybrid_model(config, pattern="PP", spec=None, position_embedding_type="rope"):
    """A HybridModel of ``pattern`` layers from ``spec`` (default: the Falcon-H1 local stack
    spec) for the tiny configs: 64-token vocabulary and sequences, untied output layer."""
    from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(
        config=config,
        hybrid_stack_spec=falcon_h1_stack_spec if spec is None else spec,
        vocab_size=64,
        max_sequence_length=64,
        hybrid_layer_pattern=pattern,
        share_embeddings_and_output_weights=False,
        position_embedding_type=position_embedding_type,
    )
