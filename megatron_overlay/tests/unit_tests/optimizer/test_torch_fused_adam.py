# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""--use-torch-fused-adam: Megatron's Adam is PyTorch's fused AdamW, and steps like the default.

Runs on a GPU (NCCL), or on CPU (gloo) where the tree has Megatron's CPU training support.
"""

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig


def _optimizer(use_torch_fused_adam: bool, device: str):
    model = torch.nn.Linear(16, 8, bias=False, device=device)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1.0, 1.0, 128).reshape(8, 16))
    model = DistributedDataParallel(
        TransformerConfig(num_attention_heads=1, num_layers=1),
        DistributedDataParallelConfig(),
        model,
    )
    config = OptimizerConfig(
        optimizer='adam', lr=0.01, weight_decay=0.1, use_torch_fused_adam=use_torch_fused_adam
    )
    return model, get_megatron_optimizer(config, [model])


def _inner(optimizer):
    """The torch optimizer inside Megatron's wrappers."""
    while hasattr(optimizer, "chained_optimizers"):
        (optimizer,) = optimizer.chained_optimizers
    return optimizer.optimizer


def _train(use_torch_fused_adam: bool, device: str) -> torch.Tensor:
    model, optimizer = _optimizer(use_torch_fused_adam, device)
    x = torch.linspace(-2.0, 2.0, 64, device=device).reshape(4, 16)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        model.finish_grad_sync()
        optimizer.step()
    return model.module.weight.detach().clone()


def test_picks_pytorch_fused_adamw(single_rank):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, optimizer = _optimizer(True, device)
    inner = _inner(optimizer)
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True
    _, default = _optimizer(False, device)
    assert not _inner(default).defaults.get("fused")


def test_steps_like_the_default_adam(single_rank):
    """Same AdamW update (decoupled weight decay) as the default optimizer: equal up to the
    fused kernel's operation order (fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused, default = _train(True, device), _train(False, device)
    start = torch.linspace(-1.0, 1.0, 128).reshape(8, 16).to(device)
    assert not torch.allclose(fused, start, atol=1e-3)  # the steps moved the weights
    torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "fields, flag",
    [
        (dict(optimizer="sgd"), "--optimizer adam"),
        (dict(optimizer_cpu_offload=True), "--optimizer-cpu-offload"),
    ],
)
def test_refuses_combinations_it_does_not_serve(fields, flag):
    with pytest.raises(ValueError, match=flag):
        OptimizerConfig(use_torch_fused_adam=True, **fields)
