"""Ranks of ``test_padded_vocab.py``: a converted checkpoint's loss and logits at TP > 1.

Every rank of a CPU gloo world (TP ranks, PP=1) loads its shard of a converted legacy checkpoint
the way ``pretrain_mamba.py --use-checkpoint-args`` does (``conv_workers.load_converted``), then
computes the per-token loss (vocabulary-parallel cross entropy over the TP group) and its own
vocabulary-parallel slice of the logits, with the checkpoint's ``--unpadded-vocab-size`` and
without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import torch


def worker(rank: int, world: int, spec: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    work = Path(spec["work"])
    dist.init_process_group("gloo", init_method=f"file://{work}/init", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from falcon_h1 import conv_workers

    ps.initialize_model_parallel(world, 1)
    model_parallel_cuda_manual_seed(1234)
    data = torch.load(work / "inputs.pt")
    result = {}
    for name, override in (("masked", None), ("unmasked", {"unpadded_vocab_size": None})):
        args, model = conv_workers.load_converted(spec["ckpt"], "torch", args_override=override)
        model.eval()
        with torch.no_grad():
            loss = model(
                input_ids=data["tokens"],
                position_ids=data["positions"],
                attention_mask=None,
                labels=data["labels"],
            )
            logits = model(
                input_ids=data["tokens"], position_ids=data["positions"], attention_mask=None
            )
        result[name] = {"loss": loss, "logits": logits, "args_unpadded": args.unpadded_vocab_size}
    result["tp_rank"] = ps.get_tensor_model_parallel_rank()
    torch.save(result, work / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


_PRELOAD = [
    "torch",
    "falcon_h1.conv_workers",
    "falcon_h1.padded_vocab_workers",
    "falcon_h1_conversion",
    "hybrid_builders",
    "megatron.training.arguments",
    "megatron.training.checkpointing",
]


def run_world(world: int, spec: dict) -> List[dict]:
    """Run :func:`worker` on ``world`` forked CPU processes; each rank's results."""
    import torch.multiprocessing as mp

    from cpu_ranks import forkserver_env

    with forkserver_env(_PRELOAD, [p for p in sys.path if p and os.path.isdir(p)]):
        mp.start_processes(worker, args=(world, spec), nprocs=world, start_method="forkserver")
    return [torch.load(Path(spec["work"]) / f"rank{r}.pt") for r in range(world)]
