# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""resolve_hybrid_stack_spec: the one place both hybrid model builders pick their stack spec.

HybridModelBuilder (pretrain_hybrid.py) and hybrid_builders.hybrid_builder (model_provider
path) are checked through their real build functions with HybridModel replaced by a mock, so
each test sees the spec a model would be built with. The helpers serve the tests of the
defaults other features add.
"""

from types import SimpleNamespace
from unittest.mock import MagicMock, patch

import pytest

from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_stack_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.models.hybrid import (
    HybridModelBuilder,
    HybridModelConfig,
    resolve_hybrid_stack_spec,
)


def transformer_config(impl: str, **kwargs) -> TransformerConfig:
    """A tiny config with ``transformer_impl=impl``."""
    return TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, transformer_impl=impl, **kwargs
    )


def spec_built_by_hybrid_model_builder(config, pattern="M*", spec=None):
    """Stack spec HybridModelBuilder.build_model gives HybridModel (``spec``: as --spec)."""
    model_config = HybridModelConfig(transformer=config, vocab_size=128)
    model_config.hybrid_layer_pattern = pattern
    model_config.hybrid_stack_spec = spec
    with patch("megatron.training.models.hybrid.HybridModel") as model:
        HybridModelBuilder(model_config).build_model(
            MagicMock(), pre_process=True, post_process=True
        )
    return model.call_args.kwargs["hybrid_stack_spec"]


def spec_built_by_hybrid_builder(config, pattern="M*", spec=None):
    """Stack spec hybrid_builders.hybrid_builder gives HybridModel (``spec``: --spec words)."""
    import hybrid_builders

    args = SimpleNamespace(
        spec=spec,
        hybrid_layer_pattern=pattern,
        padded_vocab_size=128,
        max_position_embeddings=16,
        fp16_lm_cross_entropy=False,
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=10000,
    )
    with patch.object(hybrid_builders, "HybridModel") as model:
        model.return_value.decoder.num_layers_per_pipeline_rank = 0
        hybrid_builders.hybrid_builder(args, True, True, config=config)
    return model.call_args.kwargs["hybrid_stack_spec"]


def test_chosen_spec_wins():
    chosen, default = ModuleSpec(module=object), ModuleSpec(module=dict)
    for impl in ("local", "transformer_engine"):
        config = transformer_config(impl)
        assert resolve_hybrid_stack_spec(config, "M*", chosen, default) is chosen


def test_local_impl_gets_the_local_stack():
    config = transformer_config("local")
    default = ModuleSpec(module=dict)
    assert resolve_hybrid_stack_spec(config, "M*-", None, default) is hybrid_stack_spec_local
    assert resolve_hybrid_stack_spec(config, None, None, None) is hybrid_stack_spec_local


def test_other_impls_get_the_default_or_need_a_spec():
    config = transformer_config("transformer_engine")
    default = ModuleSpec(module=dict)
    assert resolve_hybrid_stack_spec(config, "M*", None, default) is default
    with pytest.raises(ValueError, match="--spec"):
        resolve_hybrid_stack_spec(config, "M*", None, None)


def test_hybrid_model_builder():
    local, te = transformer_config("local"), transformer_config("transformer_engine")
    assert spec_built_by_hybrid_model_builder(local) is hybrid_stack_spec_local
    assert spec_built_by_hybrid_model_builder(te) is te_stack_spec
    chosen = ModuleSpec(module=object)
    assert spec_built_by_hybrid_model_builder(local, spec=chosen) is chosen


def test_hybrid_builder():
    local, te = transformer_config("local"), transformer_config("transformer_engine")
    assert spec_built_by_hybrid_builder(local) is hybrid_stack_spec_local
    with pytest.raises(ValueError, match="--spec"):
        spec_built_by_hybrid_builder(te)
    te_spec = ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]
    assert spec_built_by_hybrid_builder(local, spec=te_spec) is te_stack_spec
    # A --spec that does not import is an error, not the default spec.
    with pytest.raises(AssertionError, match="no_such_module"):
        spec_built_by_hybrid_builder(local, spec=["megatron.no_such_module", "spec"])
