# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Patterns with parallel hybrid ('P') layers default to the Falcon-H1 stack in both hybrid
model builders (resolve_hybrid_stack_spec)."""

import pytest

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.hybrid.falcon_h1_layer_specs import (
    falcon_h1_stack_spec,
    get_falcon_h1_stack_spec_for_impl,
)
from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.training.models.hybrid import resolve_hybrid_stack_spec
from tests.unit_tests.training.models.test_hybrid_stack_spec_resolution import (
    spec_built_by_hybrid_builder,
    spec_built_by_hybrid_model_builder,
    transformer_config,
)


@pytest.mark.parametrize("pattern", ["P", "PM*-", "M*|PP", "PP/P"])
def test_p_patterns_get_the_falcon_h1_stack(pattern):
    config = transformer_config("local")
    assert resolve_hybrid_stack_spec(config, pattern, None, None) is falcon_h1_stack_spec
    assert spec_built_by_hybrid_model_builder(config, pattern) is falcon_h1_stack_spec
    assert spec_built_by_hybrid_builder(config, pattern) is falcon_h1_stack_spec


def test_other_patterns_and_chosen_specs_are_unchanged():
    config = transformer_config("local")
    assert resolve_hybrid_stack_spec(config, "M*-", None, None) is hybrid_stack_spec_local
    chosen = ModuleSpec(module=object)
    assert resolve_hybrid_stack_spec(config, "PP", chosen, None) is chosen
    assert spec_built_by_hybrid_model_builder(config, "PP", spec=chosen) is chosen


def test_transformer_engine_impl_gets_the_te_stack():
    config = transformer_config("transformer_engine")
    if not HAVE_TE:
        with pytest.raises(ImportError, match="falcon_h1_stack_spec"):
            resolve_hybrid_stack_spec(config, "PP", None, None)
        return
    spec = resolve_hybrid_stack_spec(config, "PP", None, None)
    expected = get_falcon_h1_stack_spec_for_impl("transformer_engine")
    assert spec.submodules.parallel_hybrid_layer == expected.submodules.parallel_hybrid_layer
    assert spec != falcon_h1_stack_spec
