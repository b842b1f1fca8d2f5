# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""--use-torch-fused-adam: Megatron's Adam is PyTorch's fused AdamW, and steps like the default;
under the optimizer CUDA graph it follows the learning-rate schedule.

Runs on a GPU (NCCL), or on CPU (gloo) where the tree has Megatron's CPU training support (the
graph test needs a GPU).
"""

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_cuda_graph import OptimizerCudaGraphWrapper
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig


def _optimizer(
    use_torch_fused_adam: bool, device: str, optimizer_cuda_graph: bool = False, bias: bool = False
):
    model = torch.nn.Linear(16, 8, bias=bias, device=device)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1.0, 1.0, 128).reshape(8, 16))
    model = DistributedDataParallel(
        TransformerConfig(num_attention_heads=1, num_layers=1),
        DistributedDataParallelConfig(),
        model,
    )
    config = OptimizerConfig(
        optimizer='adam',
        lr=0.01,
        min_lr=0.001,
        weight_decay=0.1,
        use_torch_fused_adam=use_torch_fused_adam,
        optimizer_cuda_graph=optimizer_cuda_graph,
    )
    return model, get_megatron_optimizer(config, [model])


def _scheduler(optimizer) -> OptimizerParamScheduler:
    """Learning rate 0.01 falling linearly to 0.001 over 4 steps; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=0.01, min_lr=0.001, lr_warmup_steps=0, lr_decay_steps=4,
        lr_decay_style="linear", start_wd=0.1, end_wd=0.1, wd_incr_steps=4,
        wd_incr_style="constant",
    )  # fmt: skip


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


def test_capturable_torch_adam_keeps_a_learning_rate_tensor_per_group(single_rank):
    """Under --optimizer-cuda-graph (capturable) each group's learning rate is a tensor of its
    own, which the scheduler updates in place: a float would be frozen into the captured step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, optimizer = _optimizer(True, device, optimizer_cuda_graph=True, bias=True)
    groups = _inner(optimizer).param_groups
    assert len(groups) == 2  # weight decay on the weight, none on the bias
    lrs = [g["lr"] for g in groups]
    assert all(isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 for lr in lrs), lrs
    assert lrs[0] is not lrs[1]
    assert all(lr.device == g["params"][0].device for lr, g in zip(lrs, groups))
    scheduler = _scheduler(optimizer)
    scheduler.step(2)
    assert all(g["lr"] is lr for g, lr in zip(groups, lrs))  # updated in place
    assert [lr.item() for lr in lrs] == [pytest.approx(0.0055)] * 2
    _, eager = _optimizer(True, device, bias=True)
    assert all(isinstance(g["lr"], float) for g in _inner(eager).param_groups)


def _train_with_schedule(graphed: bool, float_lr: bool = False) -> torch.Tensor:
    """4 steps of PyTorch's fused AdamW built for the optimizer graph, the step eager or
    replayed from upstream's OptimizerCudaGraphWrapper (captured at the second step)."""
    model, optimizer = _optimizer(True, "cuda", optimizer_cuda_graph=True)
    if float_lr:  # the learning rate as it was before tensor_learning_rates
        for group in _inner(optimizer).param_groups:
            group["lr"] = float(group["lr"])
    scheduler = _scheduler(optimizer)
    step = OptimizerCudaGraphWrapper(optimizer.step, cuda_graph_warmup_steps=1) if graphed else None
    x = torch.linspace(-2.0, 2.0, 64, device="cuda").reshape(4, 16)
    try:
        for _ in range(4):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            model.finish_grad_sync()
            (step or optimizer.step)()
            scheduler.step(1)
    finally:
        if step is not None:  # the wrapper keeps its graph and step count in the class
            step.__del__()
            OptimizerCudaGraphWrapper.curr_iteration = 0
    torch.cuda.synchronize()
    return model.module.weight.detach().clone()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the optimizer CUDA graph needs a GPU")
def test_optimizer_graph_follows_the_learning_rate_schedule(single_rank):
    """Graph replays of PyTorch's fused AdamW apply each step's learning rate: the weights
    equal the eager optimizer's bit for bit (same kernel, same inputs). The control: with the
    learning rate as a float the replays keep the capture step's rate and the weights differ."""
    eager = _train_with_schedule(graphed=False)
    assert torch.equal(_train_with_schedule(graphed=True), eager)
    frozen = _train_with_schedule(graphed=True, float_lr=True)
    assert (frozen - eager).abs().max() > 1e-4
