# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Adam's step count survives a DistributedOptimizer checkpoint whichever Adam wrote or reads it.

torch.optim keeps the count per parameter, TE's FusedAdam per parameter group (a CUDA tensor
when capturable). The CPU tests run torch's fused AdamW as Megatron holds it where Transformer
Engine is installed (``HAVE_APEX_OR_TE`` set); the ``gpu`` test checks TE's capturable FusedAdam
against torch's fused AdamW both ways. Runs on a GPU (NCCL), or on CPU (gloo) where the tree has
Megatron's CPU training support.
"""

import importlib.util

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer.adam_step import (
    as_group_step,
    distinct_group_steps,
    keeps_step_per_param,
)
from megatron.core.transformer import TransformerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def single_rank(tmp_path):
    """A one-process world with Megatron's model-parallel state (TP = PP = 1)."""
    if torch.cuda.is_available():
        backend = "nccl"
    elif importlib.util.find_spec("megatron.core.device_utils") is not None:
        backend = "gloo"
    else:
        pytest.skip("needs a CUDA GPU, or a tree with Megatron's CPU training support")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            backend, init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0
        )
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def te_installed(monkeypatch):
    """DistributedOptimizer as imported where Transformer Engine is installed."""
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


def test_keeps_step_per_param():
    param = [torch.nn.Parameter(torch.zeros(2))]
    assert keeps_step_per_param(torch.optim.AdamW(param))
    assert keeps_step_per_param(torch.optim.Adam(param))
    assert not keeps_step_per_param(torch.optim.SGD(param, lr=0.1))


@pytest.mark.parametrize(
    "step", [3, 3.0, torch.tensor([3], dtype=torch.int32), torch.tensor(3.0)], ids=str
)
def test_as_group_step_is_a_plain_int(step):
    got = as_group_step(step)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("step", [2.5, torch.tensor([3, 3])], ids=["fraction", "two_elements"])
def test_as_group_step_refuses_what_is_not_a_count(step):
    with pytest.raises(ValueError, match="step count"):
        as_group_step(step)


def test_distinct_group_steps_deduplicates_tensors():
    """A capturable FusedAdam's groups hold equal but distinct tensors."""
    groups = [
        {"params": [0], "step": torch.tensor([4], dtype=torch.int32)},
        {"params": [1], "step": torch.tensor([4], dtype=torch.int32)},
        {"params": [], "step": 1},  # empty groups are not counted
        {"params": [2]},
    ]
    assert distinct_group_steps(groups) == [4]


def _optimizer(use_torch_fused_adam: bool, capturable: bool = False):
    """A Linear with a bias (two parameter groups: with and without weight decay) under the
    distributed optimizer; the DistributedOptimizer and its model."""
    model = torch.nn.Linear(16, 8, device=DEVICE)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1.0, 1.0, 128).reshape(8, 16))
        model.bias.copy_(torch.linspace(-0.5, 0.5, 8))
    model = DistributedDataParallel(
        TransformerConfig(num_attention_heads=1, num_layers=1),
        DistributedDataParallelConfig(use_distributed_optimizer=True),
        model,
    )
    config = OptimizerConfig(
        optimizer="adam",
        lr=0.01,
        weight_decay=0.1,
        use_distributed_optimizer=True,
        use_torch_fused_adam=use_torch_fused_adam,
        optimizer_cuda_graph=capturable,
    )
    optimizer = get_megatron_optimizer(config, [model])
    while hasattr(optimizer, "chained_optimizers"):
        (optimizer,) = optimizer.chained_optimizers
    assert isinstance(optimizer, distrib_optimizer.DistributedOptimizer)
    return model, optimizer


def _train(model, optimizer, steps: int) -> None:
    x = torch.linspace(-2.0, 2.0, 64, device=DEVICE).reshape(4, 16)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        model.finish_grad_sync()
        optimizer.step()


def _load(optimizer, state_dict) -> None:
    """As a checkpoint load does: zero moments first (the checkpoint's would replace them)."""
    optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
    optimizer.load_state_dict(state_dict)


def _group_steps(state_dict) -> list:
    return [g.get("step") for g in state_dict["optimizer"]["param_groups"]]


def _param_steps(optimizer) -> list:
    return [float(s["step"]) for s in optimizer.optimizer.state.values()]


@pytest.mark.parametrize("saved", [2.0, 2], ids=["torch_checkpoint", "fused_adam_checkpoint"])
def test_torch_fused_adam_resumes_where_te_is_installed(single_rank, te_installed, saved):
    """Save: the per-parameter count goes to every group. Load (a checkpoint of torch.optim, or
    of TE's FusedAdam, whose counts are ints): back into every parameter's state, so the next
    step is step 3."""
    model, optimizer = _optimizer(use_torch_fused_adam=True)
    assert keeps_step_per_param(optimizer.optimizer)
    _train(model, optimizer, 2)
    state_dict = optimizer.state_dict()
    assert len(state_dict["optimizer"]["param_groups"]) == 2
    assert _group_steps(state_dict) == [2.0, 2.0]

    for group in state_dict["optimizer"]["param_groups"]:
        group["step"] = saved
    model, resumed = _optimizer(use_torch_fused_adam=True)
    _load(resumed, state_dict)
    assert _param_steps(resumed) == [2.0, 2.0]
    _train(model, resumed, 1)
    assert _param_steps(resumed) == [3.0, 3.0]


@pytest.mark.gpu
@pytest.mark.parametrize("capturable", [True, False], ids=["capturable", "eager"])
def test_te_fused_adam_and_torch_fused_adam_resume_each_other(single_rank, capturable):
    """TE's FusedAdam -> torch's fused AdamW and back: the count carries over both ways,
    also from a capturable FusedAdam (one CUDA tensor per group, which failed to save)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs a CUDA GPU and Transformer Engine")
    model, te = _optimizer(use_torch_fused_adam=False, capturable=capturable)
    assert not keeps_step_per_param(te.optimizer)
    _train(model, te, 2)
    saved = te.state_dict()
    assert _group_steps(saved) == [2, 2]

    model, torch_adam = _optimizer(use_torch_fused_adam=True, capturable=capturable)
    _load(torch_adam, saved)
    _train(model, torch_adam, 1)
    assert _param_steps(torch_adam) == [3.0, 3.0]

    saved = torch_adam.state_dict()
    assert _group_steps(saved) == [3.0, 3.0]
    model, te = _optimizer(use_torch_fused_adam=False, capturable=capturable)
    _load(te, saved)
    assert [type(g["step"]) for g in te.optimizer.param_groups] == [int, int]
    _train(model, te, 1)
    assert [as_group_step(g["step"]) for g in te.optimizer.param_groups] == [4, 4]
