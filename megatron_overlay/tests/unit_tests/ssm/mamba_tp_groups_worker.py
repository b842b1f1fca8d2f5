# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Ranks of ``test_mamba_tp_groups.py``: one Mamba-2 mixer at TP > n_groups vs one rank.

Each rank of a CPU gloo world (all ranks one TP group) builds Megatron's ``MambaMixer`` from the
Falcon-H1 spec (multiplier-aware projections, all multipliers distinct), loads its shard of one
set of global weights (every component of ``in_proj`` / ``conv1d`` split evenly, as the
converter and ``sharded_state_dict`` lay them out), runs forward and backward on the same
input and returns its output, input gradient and parameter gradients. The parent compares them
with the same mixer on one rank. Also a static-inference prefill + decode, compared with the
full forward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import torch

from tests.unit_tests.gloo_ranks import forkserver_env
from tests.unit_tests.ssm.falcon_h1_multipliers import MULTIPLIERS as ALL_MULTIPLIERS

# The Mamba mixer's multipliers (all distinct and != 1).
MULTIPLIERS = {
    name: ALL_MULTIPLIERS[name]
    for name in ("ssm_in_multiplier", "ssm_out_multiplier", "ssm_multipliers")
}
SEQ, BATCH, HIDDEN = 11, 2, 24


def config(case: dict, tp: int):
    """Mixer config of ``case`` (float64: the comparisons are exact up to summation order)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        is_hybrid_model=True,
        mamba_num_heads=8,
        mamba_head_dim=4,
        mamba_num_groups=case["groups"],
        mamba_state_dim=8,
        mamba_chunk_size=4,
        mamba_rms_norm=case["rms_norm"],
        use_mamba_mem_eff_path=case["mem_eff"],
        add_bias_linear=False,
        params_dtype=torch.float64,
        use_cpu_initialization=True,
        **MULTIPLIERS,
    )


def build_mixer(case: dict, tp: int):
    from megatron.core.models.hybrid.falcon_h1_layer_specs import LOCAL_MULTIPLIER_LINEARS
    from megatron.core.models.hybrid.hybrid_backend_specs import (
        LocalSDPASpecProvider,
        get_mamba_mixer_spec_for_backend,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    spec = get_mamba_mixer_spec_for_backend(LocalSDPASpecProvider(), LOCAL_MULTIPLIER_LINEARS)
    return build_module(
        spec,
        config(case, tp),
        d_model=HIDDEN,
        layer_number=1,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def segments(case: dict) -> Dict[str, List[int]]:
    """Global row counts of the components of each parameter (split one by one over TP)."""
    d, gs, nh = 8 * 4, case["groups"] * 8, 8
    return {
        "in_proj.weight": [d, d, gs, gs, nh],
        "conv1d_weight": [d, gs, gs],
        "conv1d_bias": [d, gs, gs],
        "dt_bias": [nh],
        "A_log": [nh],
        "D": [nh],
        "norm.weight": [d],
    }


def shard(name: str, tensor: torch.Tensor, case: dict, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a global parameter."""
    if name == "out_proj.weight":
        return tensor.chunk(tp, dim=1)[rank]
    parts = torch.split(tensor, segments(case)[name], dim=0)
    return torch.cat([p.chunk(tp, dim=0)[rank] for p in parts], dim=0)


def unshard(name: str, pieces: List[torch.Tensor], case: dict) -> torch.Tensor:
    """Inverse of :func:`shard`."""
    if name == "out_proj.weight":
        return torch.cat(pieces, dim=1)
    tp = len(pieces)
    local = [s // tp for s in segments(case)[name]]
    split = [torch.split(p, local, dim=0) for p in pieces]
    return torch.cat([split[r][i] for i in range(len(local)) for r in range(tp)], dim=0)


def run_case(case: dict, tp: int, rank: int, weights: dict, data: dict) -> dict:
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    mixer = build_mixer(case, tp)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            param.copy_(shard(name, weights[name], case, tp, rank))
    x = data["x"].clone().requires_grad_(True)
    out, _ = mixer(x)
    (out * data["grad_out"]).sum().backward()
    result = {
        "out": out.detach(),
        "grad_x": x.grad,
        "grads": {n: p.grad for n, p in mixer.named_parameters()},
    }
    if case.get("decode"):
        # Static-batching decode of the first sequence (the mixer's static decode step takes
        # one sequence: it reads the [1, b, d] step as [batch, seq, d]).
        mixer.eval()
        x1 = data["x"][:, :1]
        with torch.no_grad(), InferenceMode.active():
            ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=SEQ)
            # (HybridStack sets the offset attribute Mamba reads.)
            ctx.seqlen_offset = 0
            prefill, _ = mixer(x1[:-1], inference_context=ctx)
            ctx.sequence_len_offset = ctx.seqlen_offset = SEQ - 1
            step, _ = mixer(x1[-1:], inference_context=ctx)
        result["decode"] = torch.cat([prefill, step])
    return result


def worker(rank: int, world: int, spec: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    work = Path(spec["work"])
    init = f"file://{work}/init_{world}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(world, 1)
    model_parallel_cuda_manual_seed(1234)
    inputs = torch.load(work / "inputs.pt")
    results = {}
    for key, case in spec["cases"].items():
        try:
            results[key] = run_case(case, world, rank, inputs["weights"][key], inputs["data"])
        except Exception as exc:  # reported by the parent with the case name
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, work / f"result_{world}_{rank}.pt")
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


_PRELOAD = [
    "torch",
    "tests.unit_tests.ssm.mamba_tp_groups_worker",
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.models.hybrid.falcon_h1_layer_specs",
]


def run_world(world: int, spec: dict) -> List[dict]:
    """Run :func:`worker` on ``world`` CPU processes (one TP group); each rank's results."""
    import torch.multiprocessing as mp

    import megatron.core

    roots = [str(Path(megatron.core.__file__).parents[2])]  # holds megatron/ and tests/
    roots += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    with forkserver_env(_PRELOAD, roots):
        mp.start_processes(worker, args=(world, spec), nprocs=world, start_method="forkserver")
    return [torch.load(Path(spec["work"]) / f"result_{world}_{r}.pt") for r in range(world)]
