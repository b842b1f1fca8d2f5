# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Adam's step count and settings in DistributedOptimizer checkpoints, whichever Adam wrote them.

The implementations keep the count in different places:

* ``torch.optim.Adam`` / ``AdamW`` (also with ``fused=True`` or ``capturable=True``): a
  ``step`` tensor in every parameter's state;
* Transformer Engine's and Apex's ``FusedAdam``: ``group["step"]`` per parameter group, a
  Python int, or a one-element int tensor on the GPU when ``capturable=True`` (the optimizer
  CUDA graph).

DistributedOptimizer checkpoints store one count per parameter group as a plain number. Which
protocol applies must follow the optimizer in use, not which libraries import: with
``--use-torch-fused-adam`` and Transformer Engine installed, the inner optimizer is
``torch.optim.AdamW``. Converting on save and load lets a run resume with another
implementation (the flag is not restored from checkpoints).

The parameter groups of a checkpoint carry each implementation's own settings too (torch:
``fused``, ``capturable``, ``decoupled_weight_decay``, ...; TE: ``bias_correction``). Loaded as
they are, a TE checkpoint left torch's AdamW without its settings (non-fused, not capturable
under the optimizer CUDA graph, L2 instead of decoupled weight decay: silently wrong updates)
and a torch checkpoint left TE's FusedAdam without ``bias_correction`` (KeyError).
:func:`merge_param_group` keeps what describes how this process runs.

A capturable ``torch.optim.Adam`` / ``AdamW`` (the optimizer CUDA graph) needs its learning rate
as a tensor (:func:`tensor_learning_rates`), as TE's FusedAdam keeps it: a Python float is
recorded into the captured step as a kernel argument.
"""

from typing import Iterable, List, Union

import torch

# Settings of how an optimizer runs here, not of the training run: never taken from a checkpoint.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def keeps_step_per_param(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps Adam's step count in each parameter's state (torch.optim)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def as_group_step(step: Union[int, float, torch.Tensor]) -> int:
    """A step count as a plain int: from a capturable FusedAdam's one-element tensor, or from a
    checkpoint written by torch.optim (a float).

    FusedAdam passes ``group["step"]`` to its kernels as an int; a float there is refused by
    the non-capturable kernel and turns the capturable one's step tensor into a float tensor.
    """
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"an Adam step count must have one element, got shape {step.shape}")
        step = step.item()
    if step != int(step):
        raise ValueError(f"an Adam step count must be a whole number, got {step}")
    return int(step)


def distinct_group_steps(param_groups: Iterable[dict]) -> List[int]:
    """The distinct step counts of the parameter groups that hold parameters, as ints."""
    return sorted(
        {as_group_step(g["step"]) for g in param_groups if len(g["params"]) > 0 and "step" in g}
    )


def merge_param_group(saved: dict, current: dict) -> dict:
    """A checkpoint's parameter group ``saved`` loaded into the optimizer group ``current``.

    The checkpoint's values win (as before) except for :data:`IMPLEMENTATION_KEYS`; settings
    the checkpoint lacks (written by another implementation) keep the current optimizer's
    values; a learning rate the current optimizer keeps as a tensor (capturable) stays one.
    """
    merged = dict(current)
    merged.update(
        {k: v for k, v in saved.items() if k not in IMPLEMENTATION_KEYS and k != "params"}
    )
    lr = current.get("lr")
    if isinstance(lr, torch.Tensor) and not isinstance(merged["lr"], torch.Tensor):
        merged["lr"] = torch.tensor(float(merged["lr"]), dtype=lr.dtype, device=lr.device)
    elif isinstance(merged.get("lr"), torch.Tensor) and not isinstance(lr, torch.Tensor):
        merged["lr"] = float(merged["lr"])  # torch's foreach Adam refuses a tensor lr
    return merged


def tensor_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """In place: each parameter group of ``optimizer`` gets its learning rate as a float32
    tensor of its own, on its parameters' device.

    For a capturable ``torch.optim.Adam`` / ``AdamW``: with a Python float, the CUDA graph of the
    optimizer step (``--optimizer-cuda-graph``) records the capture step's learning rate as a
    kernel argument and every replay keeps applying it while the scheduler moves on. The
    scheduler writes a tensor learning rate in place (``fill_``), which the replays read. One
    tensor per group: torch gives the groups that set none the same default object.
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        device = group["params"][0].device if group["params"] else None
        if device is None and isinstance(lr, torch.Tensor):
            device = lr.device
        group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


def adapt_adam_state_dict(state_dict: dict, optimizer: torch.optim.Optimizer) -> None:
    """In place: an Adam state dict (``state``, ``param_groups`` in ``optimizer``'s group order)
    written by any Adam, made loadable by ``optimizer``.

    For the optimizers that keep torch's state dict format (Float16OptimizerWithFloat16Params,
    FP32Optimizer). Groups get :func:`merge_param_group`; the step count moves to where
    ``optimizer`` keeps it (per parameter for torch.optim, per group for FusedAdam). A state
    dict the same implementation wrote is left as it is.
    """
    state = state_dict["state"]
    groups = [
        merge_param_group(saved, {**current, "params": saved["params"]})
        for saved, current in zip(state_dict["param_groups"], optimizer.param_groups, strict=True)
    ]
    for group in groups:
        params = [state[pid] for pid in group["params"] if pid in state]
        if keeps_step_per_param(optimizer):
            if "step" in group:
                step = float(as_group_step(group["step"]))
                for param_state in params:
                    param_state.setdefault("step", torch.tensor(step))
            continue
        steps = {as_group_step(s.pop("step")) for s in params if "step" in s}
        if len(steps) > 1:
            raise ValueError(f"an Adam parameter group holds different step counts: {steps}")
        if steps and "step" not in group:
            (group["step"],) = steps
    state_dict["param_groups"] = groups
