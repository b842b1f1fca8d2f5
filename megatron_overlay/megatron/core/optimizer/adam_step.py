# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Adam's step count in DistributedOptimizer checkpoints, whichever Adam keeps it.

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
"""

from typing import Iterable, List, Union

import torch


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
