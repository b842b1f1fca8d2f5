# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Patterns with parallel hybrid ('P') layers default to the Falcon-H1 stack in both hybrid
model builders (resolve_hybrid_stack_spec)."""

import dataclasses
import functools

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


def _modules(node) -> list:
    """The classes and functions a spec builds, depth first (two separately built specs hold
    distinct ``functools.partial`` objects, which compare by identity: compare these instead)."""
    if isinstance(node, ModuleSpec):
        return _modules(node.module) + _modules(node.params) + _modules(node.submodules)
    if isinstance(node, functools.partial):
        return _modules(node.func) + _modules(node.keywords)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [m for f in dataclasses.fields(node) for m in _modules(getattr(node, f.name))]
    if isinstance(node, dict):
        return [m for key in sorted(node) for m in _modules(node[key])]
    if isinstance(node, (list, tuple)):
        return [m for item in node for m in _modules(item)]
    if isinstance(node, type) or callable(node):
        return [f"{node.__module__}.{node.__qualname__}"]
    return []


def test_transformer_engine_impl_gets_the_te_stack():
    config = transformer_config("transformer_engine")
    if not HAVE_TE:
        with pytest.raises(ImportError, match="falcon_h1_stack_spec"):
            resolve_hybrid_stack_spec(config, "PP", None, None)
        return
    spec = resolve_hybrid_stack_spec(config, "PP", None, None)
    expected = get_falcon_h1_stack_spec_for_impl("transformer_engine")
    layer = _modules(spec.submodules.parallel_hybrid_layer)
    assert layer == _modules(expected.submodules.parallel_hybrid_layer)
    assert any(name.endswith("TEColumnParallelLinearWithMultipliers") for name in layer), layer
    assert _modules(spec) != _modules(falcon_h1_stack_spec)
