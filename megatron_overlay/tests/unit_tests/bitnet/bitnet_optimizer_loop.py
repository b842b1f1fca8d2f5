# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""A training loop of its own (not Megatron's ``train_step``) around a Megatron optimizer.

Used by ``test_optimizer_refresh.py`` in-process (one gloo rank) and by its two-rank workers
(data parallel, distributed optimizer with the parameter all-gather overlapped with the next
forward pass).  The loop does what Bridge / NeMo-style or RL loops do: zero the grad buffers,
forward, backward, ``finish_grad_sync()``, ``optimizer.step()`` -- nothing BitNet-specific,
no explicit cache invalidation.  After every step it runs the next forward pass and records,
for every BitNet linear, whether the quantisation the forward used (the layer's cache) equals
a from-scratch quantisation of the layer's current weight.
"""

from __future__ import annotations

from typing import Dict, List

import torch

SEQ, BATCH, VOCAB = 16, 2, 64


def build(dtype: torch.dtype, distributed_optimizer: bool, overlap: bool):
    """Tiny BitNet GPT (one layer: q/k/v, proj, gate/up, down are BitNet linears) in Megatron's
    DDP wrapper, and ``get_megatron_optimizer`` (Adam) for it."""
    from megatron.core.bitnet.spec import to_bitnet_spec
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    half = dtype != torch.float32
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        gated_linear_unit=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_bitnet=True,
        transformer_impl="local",
    )
    model = GPTModel(
        config,
        to_bitnet_spec(get_gpt_layer_local_spec()),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )
    if half:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap,
        grad_reduce_in_fp32=True,
        bucket_size=2000 if overlap else None,  # several buckets: gathers finish layer by layer
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=0.05,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    return ddp, optimizer


def _batch(seed: int):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    return tokens, positions, mask


def bitnet_layers(model) -> List[torch.nn.Module]:
    from megatron.core.bitnet.layers import BitNetLinearMixin

    return [m for m in model.modules() if isinstance(m, BitNetLinearMixin)]


def run(ddp, optimizer, steps: int, seed: int = 0) -> List[Dict[str, object]]:
    """``steps`` optimizer steps of the plain loop; per step, after the next forward pass:

    * ``fresh``: per BitNet layer, the cached ``(T, beta)`` equal a from-scratch quantisation
      (with the cross-rank scale) of the weight as it is now;
    * ``t``: the cached T of every layer (to show that training changed them);
    * ``loss`` of that forward, ``gathered``: layers whose weight the forward pass itself
      changed (the overlapped all-gather of the distributed optimizer landing in the forward).
    """
    from megatron.core.bitnet import functional as F

    tokens, positions, mask = _batch(seed)
    layers = bitnet_layers(ddp)
    records = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        update_successful, _, _ = optimizer.step()
        assert update_successful
        before = [layer.weight.detach().clone() for layer in layers]
        with torch.no_grad():
            next_loss = ddp(tokens, positions, mask, labels=tokens).float().mean()
        gathered = [not torch.equal(b, layer.weight) for b, layer in zip(before, layers)]
        fresh, ts = [], []
        for layer in layers:
            cached = layer.bitnet_quantized_weight()  # what the forward used (a cache hit)
            weight = layer.weight.detach().clone()
            scratch = F.quantize_weight(weight, beta=layer.bitnet_weight_scale(weight))
            fresh.append(
                torch.equal(cached.t, scratch.t) and torch.equal(cached.beta, scratch.beta)
            )
            ts.append(cached.t.clone())
        records.append(
            {"fresh": fresh, "t": ts, "loss": next_loss.detach().clone(), "gathered": gathered}
        )
    return records


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of a data-parallel world: bf16, distributed optimizer, overlapped all-gather."""
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=world, rank=rank)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(123)
        ddp, optimizer = build(torch.bfloat16, distributed_optimizer=True, overlap=True)
        records = run(ddp, optimizer, steps=3, seed=rank)
        torch.save(records, f"{out_dir}/rank{rank}.pt")
        parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()
