# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""--use-bitnet: both hybrid model builders build BitNet projections, whichever stack spec
resolve_hybrid_stack_spec picked (a default or the caller's)."""

import pytest

from megatron.core.bitnet.layers import BitNetColumnParallelLinear, BitNetRowParallelLinear
from megatron.core.bitnet.spec import BitNetSpecError
from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_stack_spec
from megatron.training.models.hybrid import resolve_hybrid_stack_spec
from tests.unit_tests.training.models.test_hybrid_stack_spec_resolution import (
    spec_built_by_hybrid_builder,
    spec_built_by_hybrid_model_builder,
    transformer_config,
)


def _mamba_projections(stack_spec):
    """Classes of the Mamba layer's in_proj and out_proj (a class or a ModuleSpec each)."""
    mixer = stack_spec.submodules.mamba_layer.submodules.mixer.submodules
    return tuple(getattr(p, "module", p) for p in (mixer.in_proj, mixer.out_proj))


BITNET = (BitNetColumnParallelLinear, BitNetRowParallelLinear)


@pytest.mark.parametrize("pattern", ["M*-", "PM"])
def test_defaults_are_converted(pattern):
    config = transformer_config("local", use_bitnet=True)
    assert _mamba_projections(resolve_hybrid_stack_spec(config, pattern, None, None)) == BITNET
    assert _mamba_projections(spec_built_by_hybrid_model_builder(config, pattern)) == BITNET
    assert _mamba_projections(spec_built_by_hybrid_builder(config, pattern)) == BITNET


def test_chosen_spec_is_converted_not_modified():
    config = transformer_config("local", use_bitnet=True)
    spec = resolve_hybrid_stack_spec(config, "M*", hybrid_stack_spec_local, None)
    assert _mamba_projections(spec) == BITNET
    assert _mamba_projections(hybrid_stack_spec_local) != BITNET


def test_without_bitnet_nothing_is_converted():
    spec = resolve_hybrid_stack_spec(transformer_config("local"), "M*", None, None)
    assert spec is hybrid_stack_spec_local


def test_unconvertible_spec_is_an_error():
    config = transformer_config("local", use_bitnet=True)
    with pytest.raises(BitNetSpecError, match="hybrid_stack_spec"):
        resolve_hybrid_stack_spec(config, "M*", te_stack_spec, None)
