# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Worker of ``test_triton_cross_entropy.py``: the Triton cross entropy with its vocabulary split
over a CPU gloo world (Triton's interpreter), against the same function on the whole vocabulary.

Every rank builds the same full logits, targets and output gradient, keeps its vocabulary shard
(``rank * V/world`` to ``(rank + 1) * V/world``, as Megatron's output layer splits it) and runs
forward + backward. Rank 0 also runs the whole vocabulary without a group. Each rank saves its
loss and logits gradient; rank 0 adds the whole-vocabulary ones.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

SEQ, BATCH, VOCAB = 5, 3, 96
BLOCK_SIZE = 16


def inputs():
    """Full logits (bfloat16-representable float32, large spread), targets, output gradient.

    Targets include the first and last token of every shard (rows 0-3)."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(SEQ, BATCH, VOCAB, generator=gen) * 4).bfloat16().float()
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen)
    target.view(-1)[:4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1])
    grad_output = torch.randn(SEQ, BATCH, generator=gen)
    return logits, target, grad_output


def _run(logits, target, grad_output, group):
    from megatron.core.fusions.fused_cross_entropy_triton import triton_vocab_parallel_cross_entropy

    logits = logits.clone().requires_grad_()
    loss = triton_vocab_parallel_cross_entropy(logits, target, group, block_size=BLOCK_SIZE)
    loss.backward(grad_output)
    return loss.detach(), logits.grad


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the TP group."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        solo = dist.new_group([0])  # collective: every rank creates it; rank 0 alone uses it
        logits, target, grad_output = inputs()
        shard = VOCAB // world
        local = logits[..., rank * shard : (rank + 1) * shard]
        loss, grad = _run(local, target, grad_output, dist.group.WORLD)
        result = {"loss": loss, "grad": grad}
        if rank == 0:
            # The whole vocabulary in a group of one rank: the reference.
            result["full_loss"], result["full_grad"] = _run(logits, target, grad_output, solo)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
