# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Hybrid stack specs built from a backend (``BackendSpecProvider``): local or Transformer Engine.

Upstream's hybrid specs (``hybrid_layer_specs.py``) are Transformer-Engine-only. This module
builds the ``M`` (Mamba), ``*`` (attention) and ``-`` (MLP) layers and the final norm from any
backend, following ``gpt_layer_specs``' ``*_for_backend`` helpers, so one builder serves the
local (non-TE) and the TE variants. ``hybrid_stack_spec_local`` is the default stack of
``pretrain_hybrid.py --transformer-impl local``: plain ``ColumnParallelLinear`` /
``RowParallelLinear``, torch norms and ``SDPADotProductAttention``; it runs on CPUs.

Layer kinds a backend cannot serve here (``E`` MoE, ``G`` GDN, ``D`` DSA, ``+`` MLA) are built
as :class:`UnsupportedHybridLayer`, which fails at model build with a clear message instead of
silently becoming an identity layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.sdpa_attention import SDPADotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import LayerNormBuilder, WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass(frozen=True)
class MultiplierLinears:
    """Projection classes that apply forward multipliers, with their role as a spec parameter.

    See ``megatron.core.transformer.forward_multipliers``: the classes take a ``role`` keyword
    (``linear_qkv``, ``mamba_in_proj``, ...), given to them through ``ModuleSpec.params``.
    """

    column: type
    row: type

    def spec(self, parallel: str, role: str) -> ModuleSpec:
        """``ModuleSpec`` of the ``"column"`` or ``"row"`` projection playing ``role``."""
        return ModuleSpec(module=getattr(self, parallel), params={"role": role})


class LocalSDPASpecProvider(LocalSpecProvider):
    """Local backend with torch norms and SDPA core attention (runs on CPU and GPU)."""

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> LayerNormBuilder:
        """Torch LayerNorm / RMSNorm, chosen by ``config.normalization``."""
        return WrappedTorchNorm

    def core_attention(self) -> type:
        """Attention on ``torch.nn.functional.scaled_dot_product_attention``."""
        return SDPADotProductAttention


class UnsupportedHybridLayer:
    """Placeholder for a layer kind a hybrid spec does not provide; fails when built.

    Use as ``ModuleSpec(module=UnsupportedHybridLayer, params={"symbol": "E"})``.
    """

    def __init__(self, *args, symbol: str, **kwargs):
        raise ValueError(
            f"--hybrid-layer-pattern symbol '{symbol}' is not supported by this hybrid "
            "stack spec (the local and Falcon-H1 specs provide M, *, - and P); use upstream's "
            "Transformer Engine spec for it."
        )


def _unsupported(symbol: str) -> ModuleSpec:
    return ModuleSpec(module=UnsupportedHybridLayer, params={"symbol": symbol})


def _linears(backend: BackendSpecProvider, multiplier_linears: Optional[MultiplierLinears]):
    """Column / row projection (class or spec) per role, with multipliers when classes are given."""

    def column(role: str) -> Union[type, ModuleSpec]:
        if multiplier_linears is not None:
            return multiplier_linears.spec("column", role)
        return backend.column_parallel_linear()

    def row(role: str) -> Union[type, ModuleSpec]:
        if multiplier_linears is not None:
            return multiplier_linears.spec("row", role)
        return backend.row_parallel_linear()

    return column, row


def get_attention_submodules_for_backend(
    backend: BackendSpecProvider,
    multiplier_linears: Optional[MultiplierLinears] = None,
    fuse_input_norm: bool = False,
) -> ModuleSpec:
    """Causal self-attention spec (its input norm is fused into ``linear_qkv`` if asked)."""
    column, row = _linears(backend, multiplier_linears)
    linear_qkv = (
        backend.column_parallel_layer_norm_linear() if fuse_input_norm else column("linear_qkv")
    )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=backend.core_attention(),
            linear_proj=row("linear_proj"),
        ),
    )


def get_mamba_mixer_spec_for_backend(
    backend: BackendSpecProvider,
    multiplier_linears: Optional[MultiplierLinears] = None,
    fuse_input_norm: bool = False,
) -> ModuleSpec:
    """Mamba-2 mixer spec (its input norm is fused into ``in_proj`` if asked)."""
    column, row = _linears(backend, multiplier_linears)
    in_proj = (
        backend.column_parallel_layer_norm_linear() if fuse_input_norm else column("mamba_in_proj")
    )
    return ModuleSpec(
        module=MambaMixer,
        submodules=MambaMixerSubmodules(in_proj=in_proj, out_proj=row("mamba_out_proj")),
    )


def get_dense_mlp_for_backend(
    backend: BackendSpecProvider,
    multiplier_linears: Optional[MultiplierLinears] = None,
    fuse_input_norm: bool = False,
):
    """Dense MLP builder (``MLP.as_mlp_submodule``)."""
    column, row = _linears(backend, multiplier_linears)
    fc1 = backend.column_parallel_layer_norm_linear() if fuse_input_norm else column("linear_fc1")
    return partial(
        MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row("linear_fc2"))
    )


def get_hybrid_stack_spec_for_backend(
    backend: BackendSpecProvider,
    multiplier_linears: Optional[MultiplierLinears] = None,
    parallel_hybrid_layer: Optional[ModuleSpec] = None,
) -> ModuleSpec:
    """Hybrid stack spec for ``M``, ``*``, ``-`` (and ``P`` when a layer spec is given).

    Args:
        backend: which linears, norms and core attention to use.
        multiplier_linears: projection classes applying forward multipliers (their role is a
            spec parameter). With them, input norms are never fused into projections, so an
            input multiplier always acts on the normed activation.
        parallel_hybrid_layer: spec of the ``P`` layer, if the stack should support it.
    """
    fuse = backend.fuse_layernorm_and_linear() and multiplier_linears is None
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=IdentityOp if fuse else norm,
                    mixer=get_mamba_mixer_spec_for_backend(backend, multiplier_linears, fuse),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=IdentityOp if fuse else norm,
                    self_attention=get_attention_submodules_for_backend(
                        backend, multiplier_linears, fuse
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=IdentityOp if fuse else norm,
                    mlp=get_dense_mlp_for_backend(backend, multiplier_linears, fuse),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=_unsupported("E"),
            gdn_layer=_unsupported("G"),
            dsa_layer=_unsupported("D"),
            mla_layer=_unsupported("+"),
            parallel_hybrid_layer=parallel_hybrid_layer,
            final_norm=norm,
        ),
    )


hybrid_stack_spec_local = get_hybrid_stack_spec_for_backend(LocalSDPASpecProvider())
"""Default ``pretrain_hybrid.py --transformer-impl local`` stack: M, *, - on local modules."""
