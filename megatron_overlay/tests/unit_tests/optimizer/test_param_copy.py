# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""After the optimizer step, the bf16 model parameters get the updated fp32 main parameters in one
foreach copy (one multi-tensor kernel per dtype pair on a GPU, where a loop of copies launched a
kernel per parameter: 471 per step for Falcon-H1-0.5B), with the distributed optimizer and
without it.

Runs on a GPU (NCCL), or on CPU (gloo) where the tree has Megatron's CPU training support.
"""

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS = 3  # Linear(8, 8) layers: 2 * LAYERS parameters


def _bf16_model_and_optimizer(distributed: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(LAYERS)])
    model = model.to(device=DEVICE, dtype=torch.bfloat16)
    model = DistributedDataParallel(
        TransformerConfig(num_attention_heads=1, num_layers=1, bf16=True),
        DistributedDataParallelConfig(use_distributed_optimizer=distributed),
        model,
    )
    config = OptimizerConfig(
        optimizer="adam", lr=0.01, bf16=True, use_distributed_optimizer=distributed
    )
    optimizer = get_megatron_optimizer(config, [model])
    while hasattr(optimizer, "chained_optimizers"):
        (optimizer,) = optimizer.chained_optimizers
    return model, optimizer


def _backward(model):
    x = torch.linspace(-1.0, 1.0, 32, device=DEVICE).reshape(4, 8).bfloat16()
    model(x).float().pow(2).sum().backward()
    model.finish_grad_sync()


def _model_and_main_params(optimizer):
    """(bf16 model parameter, its fp32 main parameter) pairs: with one data-parallel rank the
    distributed optimizer's shards are whole parameters."""
    if hasattr(optimizer, "shard_fp32_from_float16_groups"):
        groups = zip(optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups)
    else:
        groups = zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups)
    return [pair for model_group, main_group in groups for pair in zip(model_group, main_group)]


@pytest.mark.parametrize("distributed", [False, True], ids=["float16_optimizer", "distributed"])
def test_step_copies_main_params_to_the_model_in_one_foreach_call(
    single_rank, monkeypatch, distributed
):
    model, optimizer = _bf16_model_and_optimizer(distributed)
    _backward(model)
    calls = []
    foreach_copy = torch._foreach_copy_

    def spy(destinations, sources, *args, **kwargs):
        calls.append(([d.dtype for d in destinations], [s.dtype for s in sources]))
        return foreach_copy(destinations, sources, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.step()[0]
    monkeypatch.undo()

    n_params = 2 * LAYERS
    assert calls == [([torch.bfloat16] * n_params, [torch.float32] * n_params)]
    # The model holds the updated main parameters, rounded to bf16.
    pairs = _model_and_main_params(optimizer)
    assert len(pairs) == n_params
    for model_param, main_param in pairs:
        assert torch.equal(
            model_param.detach().reshape(-1), main_param.detach().reshape(-1).bfloat16()
        )
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("distributed", [False, True], ids=["float16_optimizer", "distributed"])
def test_gpu_main_to_model_copy_launches_fewer_kernels_than_parameters(single_rank, distributed):
    """The point of the foreach copy: fewer kernels than parameters (one per chunk of the
    multi-tensor kernel), where a loop launched one per parameter."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = _bf16_model_and_optimizer(distributed)
    _backward(model)
    optimizer.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer._copy_main_params_to_model_params()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) < 2 * LAYERS, [e.name for e in kernels]
