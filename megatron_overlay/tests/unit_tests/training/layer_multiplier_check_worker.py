# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Ranks of ``test_layer_multiplier_check.py``: build a PP=2 hybrid model the way training does.

Each rank of a 2-process CPU gloo world (TP=1, PP=2) builds its pipeline stage with
``HybridModelBuilder.build_distributed_models`` (the ``pretrain_hybrid.py`` path) for every
case in turn, and records whether the build raised and with what message. The parent test
compares the outcome of both ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import torch

from tests.unit_tests.gloo_ranks import forkserver_env

# name: (hybrid layer pattern split over two stages, layer multipliers set)
CASES: Dict[str, tuple] = {
    # key multiplier applied by stage 0 only, SSM multipliers by stage 1 only: valid.
    "attention_then_mamba": ("*-|M-", dict(key_multiplier=0.5, ssm_multipliers=[2, 3, 4, 5, 6])),
    # no stage has attention: --key-multiplier applies nowhere.
    "no_attention_anywhere": ("M-|M-", dict(key_multiplier=0.5)),
}


def _build(pattern: str, multipliers: dict) -> None:
    from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.models.hybrid import HybridModelBuilder, HybridModelConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=6,
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        is_hybrid_model=True,
        mamba_num_heads=4,
        mamba_head_dim=4,
        mamba_num_groups=1,
        mamba_state_dim=4,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        transformer_impl="local",
        **multipliers,
    )
    model_config = HybridModelConfig(
        transformer=config,
        vocab_size=64,
        seq_length=16,
        hybrid_layer_pattern=pattern,
        hybrid_stack_spec=falcon_h1_stack_spec,
        position_embedding_type="rope",
    )
    HybridModelBuilder(model_config).build_distributed_models(
        ProcessGroupCollection.use_mpu_process_groups(),
        wrap_with_ddp=False,
        mixed_precision_wrapper=None,
    )


def worker(rank: int, world: int, work: str, names: List[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{work}/init", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(1, world)
    model_parallel_cuda_manual_seed(1234)
    results = {}
    for name in names:
        pattern, multipliers = CASES[name]
        try:
            _build(pattern, multipliers)
            results[name] = None
        except ValueError as exc:
            results[name] = str(exc)
    torch.save(results, Path(work) / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


_PRELOAD = [
    "torch",
    "tests.unit_tests.training.layer_multiplier_check_worker",
    "megatron.training.models.hybrid",
]


def run_world(work: Path, names: List[str], world: int = 2) -> List[dict]:
    """Run :func:`worker` on ``world`` forked CPU processes; each rank's ``{case: error}``."""
    import torch.multiprocessing as mp

    import megatron.core

    roots = [str(Path(megatron.core.__file__).parents[2])]  # holds megatron/ and tests/
    roots += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    with forkserver_env(_PRELOAD, roots):
        mp.start_processes(
            worker, args=(world, str(work), names), nprocs=world, start_method="forkserver"
        )
    return [torch.load(work / f"rank{r}.pt") for r in range(world)]
