# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""A layer multiplier that no layer applies is an error, for every model type and build path.

The check runs once all model chunks of a rank are built (training's ``get_model`` and
``unimodal_build_distributed_models``), with the roles present reduced over the pipeline group:

* GPT (its specs have no multiplier-aware projections) with ``--key-multiplier`` is refused,
  through ``GPTModelBuilder`` (``pretrain_gpt.py``) and ``get_model`` (``gpt_builders``).
* A PP=2 hybrid whose second stage has no attention layer builds on both ranks when the first
  stage applies ``--key-multiplier`` (and the second ``--ssm-multipliers``); with no attention
  on any stage both ranks raise (none hangs in the collective).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.gloo_single_rank import requires_cpu_training
from tests.unit_tests.training import layer_multiplier_check_worker as workers


def _gpt_config(**multipliers):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=6,
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
        transformer_impl="local",
        **multipliers,
    )


def _gpt_builder(config):
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    model_config = GPTModelConfig(
        transformer=config, vocab_size=64, seq_length=16, position_embedding_type="rope"
    )
    return GPTModelBuilder(model_config)


def test_gpt_builder_refuses_key_multiplier(single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    with pytest.raises(ValueError, match="--key-multiplier is set, but no layer"):
        _gpt_builder(_gpt_config(key_multiplier=0.5)).build_distributed_models(
            pgs, wrap_with_ddp=False, mixed_precision_wrapper=None
        )
    with pytest.raises(ValueError, match="--mlp-multipliers is set, but no layer"):
        _gpt_builder(_gpt_config(mlp_multipliers=[0.5, 1.0])).build_distributed_models(
            pgs, wrap_with_ddp=False, mixed_precision_wrapper=None
        )
    # Without layer multipliers the plain GPT spec builds (lm-head / embedding multipliers are
    # applied by the model itself, not by layers).
    models = _gpt_builder(_gpt_config(lm_head_multiplier=0.5)).build_distributed_models(
        pgs, wrap_with_ddp=False, mixed_precision_wrapper=None
    )
    assert len(models) == 1


def test_get_model_refuses_key_multiplier(single_rank):
    """training.get_model (the model_provider path of gpt_builders / hybrid_builders)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.training import global_vars
    from megatron.training.training import get_model

    def provider(pre_process=True, post_process=True, **_):
        return GPTModel(
            config=_gpt_config(key_multiplier=0.5),
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=64,
            max_sequence_length=16,
            pre_process=pre_process,
            post_process=post_process,
        )

    args = SimpleNamespace(
        create_all_gather_group=False,
        virtual_pipeline_model_parallel_size=None,
        init_model_with_meta_device=False,
        freeze_all_layers=False,
    )
    global_vars.set_args(args)
    try:
        with pytest.raises(ValueError, match="--key-multiplier is set, but no layer"):
            get_model(provider, wrap_with_ddp=False)
    finally:
        global_vars.set_args(None)


@requires_cpu_training
def test_pipeline_stages_are_checked_together(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    names = list(workers.CASES)
    ranks = workers.run_world(tmp_path, names)
    assert [r["attention_then_mamba"] for r in ranks] == [None, None]
    errors = [r["no_attention_anywhere"] for r in ranks]
    assert all(e is not None and "--key-multiplier is set, but no layer" in e for e in errors)
