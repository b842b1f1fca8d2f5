# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Parallel hybrid layer (symbol ``P``): attention and Mamba-2 side by side, as in Falcon-H1.

One ``ParallelHybridLayer`` is one Falcon-H1 decoder layer::

    u = RMSNorm(x)                                  # one input norm, shared by both branches
    x = x + attention(u) + mamba(u)                 # branch outputs summed, one residual
    x = x + MLP(RMSNorm(x))

It is a :class:`TransformerLayer` whose self-attention slot holds a
:class:`ParallelHybridMixer`, the way upstream hosts GatedDeltaNet: RoPE, packed sequences,
activation recompute, layer offsets and pipeline splits keep working unchanged. The Falcon-H1
multipliers (attention in/out, key, ssm in/out, ssm segments) are applied by the branches'
projections (see ``megatron.core.transformer.forward_multipliers``), so both branches see the
same normed input and no norm is fused into a projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import deprecate_inference_params


@dataclass
class ParallelHybridMixerSubmodules:
    """Specs of the two branches of a :class:`ParallelHybridMixer`."""

    attention: Union[ModuleSpec, type, None] = None
    mamba: Union[ModuleSpec, type, None] = None


class ParallelHybridMixer(MegatronModule):
    """Runs a self-attention and a Mamba-2 mixer on the same input and sums their outputs.

    Args:
        config: model configuration.
        submodules: specs of the attention (a ``SelfAttention``) and Mamba (a ``MambaMixer``)
            branches.
        layer_number: 1-based global layer number (with pipeline offset).
        pg_collection: process groups.
        cp_comm_type: context-parallel communication type for the attention branch.
        pp_layer_offset: pipeline layer offset (used by Mamba's inference bookkeeping).
        name: module instance name.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: ParallelHybridMixerSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
        cp_comm_type: Optional[str] = None,
        pp_layer_offset: int = 0,
        name: Optional[str] = None,
    ):
        super().__init__(config=config)
        if submodules.attention is None or submodules.mamba is None:
            raise ValueError("ParallelHybridMixer needs both an `attention` and a `mamba` spec")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number
        self.attention = build_module(
            submodules.attention,
            config=config,
            layer_number=layer_number,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            pp_layer_offset=pp_layer_offset,
            name=(name + ".attention") if name is not None else None,
        )
        self.mamba = build_module(
            submodules.mamba,
            config,
            d_model=config.hidden_size,
            layer_number=layer_number,
            pg_collection=pg_collection,
            pp_layer_offset=pp_layer_offset,
            name=(name + ".mamba") if name is not None else None,
        )
        # Static inference keeps attention KV caches and Mamba states in one dict keyed by layer;
        # give the Mamba branch a key of its own so the two never overwrite each other.
        self.mamba.inference_cache_key = ("parallel_hybrid_mamba", layer_number)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        inference_context: Optional[BaseInferenceContext] = None,
        rotary_pos_emb: Optional[Union[Tensor, tuple]] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        sequence_len_offset: Optional[int] = None,
        *,
        inference_params: Optional[BaseInferenceContext] = None,
        **kwargs,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Returns ``(attention(u) + mamba(u), summed output bias or None)``."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if inference_context is not None and not inference_context.is_static_batching():
            raise NotImplementedError(
                "Parallel hybrid ('P') layers support static-batching inference only; dynamic "
                "batching keeps Mamba states per 'M' layer and cannot serve them yet."
            )
        attention_out, attention_bias_out = self.attention(
            hidden_states,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mamba_out, mamba_bias = self.mamba(
            hidden_states, inference_context=inference_context, packed_seq_params=packed_seq_params
        )
        output = attention_out + mamba_out
        biases = [b for b in (attention_bias_out, mamba_bias) if b is not None]
        bias = None
        if biases:
            bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
        return output, bias

    def mamba_state_shapes_per_request(self):
        """Conv and SSM state shapes of the Mamba branch, per request."""
        return self.mamba.mamba_state_shapes_per_request()


class ParallelHybridLayer(TransformerLayer):
    """Falcon-H1 decoder layer: one input norm, attention || Mamba-2, residual, norm, MLP.

    A :class:`TransformerLayer` whose ``self_attention`` is a :class:`ParallelHybridMixer`.
    Built for the ``P`` symbol of ``--hybrid-layer-pattern``.
    """

    def __init__(self, config: TransformerConfig, submodules, *args, **kwargs):
        self_attention = submodules.self_attention
        mixer_cls = getattr(self_attention, "module", self_attention)
        if not (isinstance(mixer_cls, type) and issubclass(mixer_cls, ParallelHybridMixer)):
            raise ValueError(
                "ParallelHybridLayer needs a ParallelHybridMixer in its self_attention slot, "
                f"got {mixer_cls!r}"
            )
        super().__init__(config, submodules, *args, **kwargs)

    def mamba_state_shapes_per_request(self):
        """Conv and SSM state shapes of this layer's Mamba branch, per request."""
        return self.self_attention.mamba_state_shapes_per_request()
