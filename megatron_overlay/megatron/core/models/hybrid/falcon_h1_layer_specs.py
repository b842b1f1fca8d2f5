# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Falcon-H1 specs: the parallel hybrid layer (``P``) and hybrid stacks with muP multipliers.

Every projection of these specs is a multiplier-aware linear (see
``megatron.core.transformer.forward_multipliers``) told its role by a spec parameter, and no
input norm is fused into a projection, so input multipliers always act after the norm. With
all multipliers at 1.0 the modules compute exactly what the plain local / TE modules compute.

Specs (``--spec megatron.core.models.hybrid.falcon_h1_layer_specs <name>``):

* ``falcon_h1_stack_spec``: local modules (torch norms, SDPA attention); CPU or GPU.
* ``falcon_h1_te_stack_spec``: Transformer Engine linears / norms / attention (built on first
  access, so importing this module does not need TE).

Both provide ``P`` plus ``M``, ``*`` and ``-``.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.hybrid.hybrid_backend_specs import (
    LocalSDPASpecProvider,
    MultiplierLinears,
    get_attention_submodules_for_backend,
    get_dense_mlp_for_backend,
    get_hybrid_stack_spec_for_backend,
    get_mamba_mixer_spec_for_backend,
)
from megatron.core.models.hybrid.parallel_hybrid_layer import (
    ParallelHybridLayer,
    ParallelHybridMixer,
    ParallelHybridMixerSubmodules,
)
from megatron.core.transformer.forward_multipliers import (
    ColumnParallelLinearWithMultipliers,
    RowParallelLinearWithMultipliers,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

LOCAL_MULTIPLIER_LINEARS = MultiplierLinears(
    column=ColumnParallelLinearWithMultipliers, row=RowParallelLinearWithMultipliers
)
"""Local (non-TE) projections applying the forward multipliers."""


def get_parallel_hybrid_layer_spec(
    backend: BackendSpecProvider, linears: MultiplierLinears = LOCAL_MULTIPLIER_LINEARS
) -> ModuleSpec:
    """Spec of one ``P`` layer: norm -> (attention || Mamba-2) -> residual -> norm -> MLP."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=ParallelHybridLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=ParallelHybridMixer,
                submodules=ParallelHybridMixerSubmodules(
                    attention=get_attention_submodules_for_backend(backend, linears),
                    mamba=get_mamba_mixer_spec_for_backend(backend, linears),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_dense_mlp_for_backend(backend, linears),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_falcon_h1_stack_spec(
    backend: BackendSpecProvider, linears: MultiplierLinears = LOCAL_MULTIPLIER_LINEARS
) -> ModuleSpec:
    """Hybrid stack (``P``, ``M``, ``*``, ``-``) whose projections apply the multipliers."""
    return get_hybrid_stack_spec_for_backend(
        backend,
        multiplier_linears=linears,
        parallel_hybrid_layer=get_parallel_hybrid_layer_spec(backend, linears),
    )


falcon_h1_stack_spec = get_falcon_h1_stack_spec(LocalSDPASpecProvider())
"""Falcon-H1 stack on local modules (no Transformer Engine needed)."""


def _te_stack_spec() -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    if not HAVE_TE:
        raise ImportError(
            "falcon_h1_te_stack_spec needs Transformer Engine; use falcon_h1_stack_spec "
            "(--transformer-impl local) without it"
        )
    from megatron.core.extensions.transformer_engine_multipliers import (
        TEColumnParallelLinearWithMultipliers,
        TERowParallelLinearWithMultipliers,
    )

    linears = MultiplierLinears(
        column=TEColumnParallelLinearWithMultipliers, row=TERowParallelLinearWithMultipliers
    )
    return get_falcon_h1_stack_spec(TESpecProvider(), linears)


def __getattr__(name: str):
    if name == "falcon_h1_te_stack_spec":
        spec = _te_stack_spec()
        globals()[name] = spec
        return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_falcon_h1_stack_spec_for_impl(transformer_impl: str) -> ModuleSpec:
    """Falcon-H1 stack for ``--transformer-impl``: Transformer Engine modules for
    ``transformer_engine``, local modules otherwise.

    A ``--hybrid-layer-pattern`` with ``P`` layers is built with it when no ``--spec`` is given
    (``resolve_hybrid_stack_spec`` in ``megatron.training.models.hybrid``).
    """
    if transformer_impl == "transformer_engine":
        return _te_stack_spec()
    return falcon_h1_stack_spec
