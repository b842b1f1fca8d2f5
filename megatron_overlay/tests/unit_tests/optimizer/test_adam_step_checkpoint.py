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

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer.adam_step import (
    adapt_adam_state_dict,
    as_group_step,
    distinct_group_steps,
    keeps_step_per_param,
    merge_param_group,
)
from megatron.core.transformer import TransformerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


TORCH_GROUP = {
    "params": [0, 1],
    "lr": 0.01,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.1,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "fused": True,
    "capturable": True,
    "differentiable": False,
    "decoupled_weight_decay": True,
    "wd_mult": 1.0,
}
TE_GROUP = {
    "lr": 0.002,
    "bias_correction": True,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "weight_decay": 0.05,
    "wd_mult": 1.0,
    "step": 7,
}


def test_merge_param_group_keeps_this_optimizers_settings():
    """A TE group into torch's fused AdamW: TE's hyper-parameters, torch's settings."""
    merged = merge_param_group(TE_GROUP, TORCH_GROUP)
    assert merged["params"] == [0, 1]
    assert (merged["lr"], merged["betas"], merged["weight_decay"]) == (0.002, (0.9, 0.95), 0.05)
    for key in ("fused", "capturable", "decoupled_weight_decay", "amsgrad", "maximize"):
        assert merged[key] == TORCH_GROUP[key], key
    back = merge_param_group(merged, {**TE_GROUP, "params": [3]})
    assert back["bias_correction"] is True and back["params"] == [3]


def test_merge_param_group_never_takes_how_an_optimizer_runs_from_a_checkpoint():
    saved = {**TORCH_GROUP, "fused": False, "capturable": False, "foreach": True}
    merged = merge_param_group(saved, TORCH_GROUP)
    assert (merged["fused"], merged["capturable"], merged["foreach"]) == (True, True, None)


def test_merge_param_group_keeps_a_tensor_learning_rate():
    """A capturable FusedAdam keeps its learning rate as a tensor (the scheduler fills it)."""
    current = {**TE_GROUP, "params": [0], "lr": torch.tensor(0.5)}
    merged = merge_param_group(TORCH_GROUP, current)
    assert isinstance(merged["lr"], torch.Tensor)
    assert float(merged["lr"]) == float(torch.tensor(0.01))  # the tensor's float32


def test_merge_param_group_gives_a_float_learning_rate_where_this_optimizer_has_one():
    """A capturable optimizer's checkpoint (tensor lr) resumed without the optimizer graph:
    torch's foreach Adam refuses a tensor lr."""
    saved = {**TE_GROUP, "lr": torch.tensor(0.25)}
    merged = merge_param_group(saved, {**TORCH_GROUP, "params": [0]})
    assert type(merged["lr"]) is float and merged["lr"] == 0.25


def _optimizer(use_torch_fused_adam: bool, capturable: bool = False, distributed: bool = True):
    """A Linear with a bias (two parameter groups: with and without weight decay) under
    Megatron's optimizer (the DistributedOptimizer unless ``distributed`` is False); the model
    and the optimizer."""
    model = torch.nn.Linear(16, 8, device=DEVICE)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1.0, 1.0, 128).reshape(8, 16))
        model.bias.copy_(torch.linspace(-0.5, 0.5, 8))
    model = DistributedDataParallel(
        TransformerConfig(num_attention_heads=1, num_layers=1),
        DistributedDataParallelConfig(use_distributed_optimizer=distributed),
        model,
    )
    config = OptimizerConfig(
        optimizer="adam",
        lr=0.01,
        weight_decay=0.1,
        use_distributed_optimizer=distributed,
        use_torch_fused_adam=use_torch_fused_adam,
        optimizer_cuda_graph=capturable,
    )
    optimizer = get_megatron_optimizer(config, [model])
    while hasattr(optimizer, "chained_optimizers"):
        (optimizer,) = optimizer.chained_optimizers
    assert isinstance(optimizer, distrib_optimizer.DistributedOptimizer) == distributed
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
        if isinstance(saved, int):  # as TE's FusedAdam writes its groups: none of torch's keys
            for key in set(TORCH_GROUP) - set(TE_GROUP) - {"params", "wd_mult"}:
                group.pop(key, None)
            group["bias_correction"] = True
    model, resumed = _optimizer(use_torch_fused_adam=True)
    _load(resumed, state_dict)
    assert _param_steps(resumed) == [2.0, 2.0]
    for group in resumed.optimizer.param_groups:
        assert group["fused"] is True and group["decoupled_weight_decay"] is True
    _train(model, resumed, 1)
    assert _param_steps(resumed) == [3.0, 3.0]


def _resume(model, optimizer, use_torch_fused_adam: bool, capturable: bool):
    """A new model and optimizer loading ``optimizer``'s checkpoint: its weights, the step count
    and settings through state_dict(), its moments copied (the sharded checkpoint's part)."""
    new_model, new = _optimizer(use_torch_fused_adam, capturable)
    new_model.module.load_state_dict(model.module.state_dict())
    _load(new, optimizer.state_dict())
    old_params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    new_params = [p for g in new.optimizer.param_groups for p in g["params"]]
    for old, param in zip(old_params, new_params, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            new.optimizer.state[param][key].copy_(optimizer.optimizer.state[old][key])
    return new_model, new


@pytest.mark.gpu
@pytest.mark.parametrize("capturable", [True, False], ids=["capturable", "eager"])
def test_te_fused_adam_and_torch_fused_adam_resume_each_other(single_rank, capturable):
    """TE's FusedAdam -> torch's fused AdamW -> TE's FusedAdam, one step each after 2 of TE's,
    equals 4 uninterrupted steps of TE's FusedAdam: step count (bias correction), settings
    (fused, decoupled weight decay) and, when capturable, saving itself (a CUDA tensor per
    group failed). fp32. Tolerance 1e-5 absolute, 0.1% of one update (lr 0.01): the two fused
    kernels round m / (sqrt(v) + eps) differently, which an element with a near-zero gradient
    amplifies (on the H200 one bias element of 8 differed by 6.9e-6, all others by < 1e-6); a
    restarted bias correction moves every element by ~57% of an update, L2 instead of decoupled
    decay by ~1e-3 |p|."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs a CUDA GPU and Transformer Engine")
    reference, ref_opt = _optimizer(use_torch_fused_adam=False, capturable=capturable)
    _train(reference, ref_opt, 4)

    model, te = _optimizer(use_torch_fused_adam=False, capturable=capturable)
    assert not keeps_step_per_param(te.optimizer)
    _train(model, te, 2)
    assert _group_steps(te.state_dict()) == [2, 2]
    model, torch_adam = _resume(model, te, use_torch_fused_adam=True, capturable=capturable)
    assert [g["fused"] for g in torch_adam.optimizer.param_groups] == [True, True]
    _train(model, torch_adam, 1)
    assert _param_steps(torch_adam) == [3.0, 3.0]
    assert _group_steps(torch_adam.state_dict()) == [3.0, 3.0]
    model, te = _resume(model, torch_adam, use_torch_fused_adam=False, capturable=capturable)
    _train(model, te, 1)
    assert [as_group_step(g["step"]) for g in te.optimizer.param_groups] == [4, 4]
    for got, want in zip(model.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _GroupStepAdam(torch.optim.Optimizer):
    """Stand-in for TE's / Apex's FusedAdam state layout: the step count per group (no math)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01, "bias_correction": True, "weight_decay": 0.0})


def test_adapt_adam_state_dict_moves_the_step_count_both_ways():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    torch_adam = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], fused=True)
    saved = {
        "state": {0: {"exp_avg": torch.zeros(2)}, 1: {"exp_avg": torch.zeros(3)}},
        "param_groups": [{**TE_GROUP, "params": [0]}, {**TE_GROUP, "params": [1]}],
    }
    adapt_adam_state_dict(saved, torch_adam)
    assert [float(s["step"]) for s in saved["state"].values()] == [7.0, 7.0]
    assert [g["fused"] for g in saved["param_groups"]] == [True, True]

    group_adam = _GroupStepAdam([{"params": params[:1]}, {"params": params[1:]}])
    adapt_adam_state_dict(saved, group_adam)
    assert [g["step"] for g in saved["param_groups"]] == [7, 7]
    assert all("step" not in s for s in saved["state"].values())
    assert all(g["bias_correction"] is True for g in saved["param_groups"])

    saved["state"][0]["step"] = torch.tensor(3.0)
    saved["state"][1]["step"] = torch.tensor(3.0)
    for group in saved["param_groups"]:
        del group["step"]
    adapt_adam_state_dict(saved, group_adam)
    assert [g["step"] for g in saved["param_groups"]] == [3, 3]


def _fp32_optimizer():
    """torch's fused AdamW under Megatron's optimizer without the distributed optimizer."""
    return _optimizer(use_torch_fused_adam=True, distributed=False)


@pytest.mark.parametrize("written_by", ["torch", "fused_adam"])
def test_non_distributed_optimizer_resumes_a_checkpoint_of_either_adam(single_rank, written_by):
    """Without the distributed optimizer: 2 steps, checkpoint (as torch or as FusedAdam writes
    it), 1 step after loading equals 3 uninterrupted steps. Tolerance 1e-5 absolute, as in the
    gpu test: the loaded state lives in new allocations and the fused kernel's vector paths
    depend on alignment (on CPU 37 of 128 weights differed by one ulp, 6e-8), which the bias
    element with a near-zero gradient amplifies (3.3e-6); a restarted bias correction or L2
    instead of decoupled decay moves every element by far more."""
    reference, ref_opt = _fp32_optimizer()
    _train(reference, ref_opt, 3)

    model, optimizer = _fp32_optimizer()
    _train(model, optimizer, 2)
    state_dict = optimizer.state_dict()
    if written_by == "fused_adam":  # step per group, none of torch's group keys
        for param_state in state_dict["state"].values():
            param_state.pop("step")
        for group in state_dict["param_groups"]:
            for key in set(TORCH_GROUP) - set(TE_GROUP) - {"params", "wd_mult"}:
                group.pop(key, None)
            group.update(bias_correction=True, step=2)
    resumed_model, resumed = _fp32_optimizer()
    resumed_model.module.load_state_dict(model.module.state_dict())
    resumed.load_state_dict(state_dict)
    assert [g["fused"] for g in resumed.optimizer.param_groups] == [True, True]
    _train(resumed_model, resumed, 1)
    assert _param_steps(resumed) == [3.0, 3.0]
    for got, want in zip(resumed_model.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
