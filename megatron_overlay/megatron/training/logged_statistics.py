# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Per-step training statistics read on the host only where they are logged.

Every training step reduces its statistics (update success, gradient norm, zero count, learning
rate) over the model-parallel group with
:func:`megatron.training.utils.common_utils.reduce_max_stat_across_model_parallel_group` and
:func:`~megatron.training.utils.common_utils.logical_and_across_model_parallel_group`, and
``train`` read the loss scale with ``.item()``. On a GPU each of those host reads waits for every
kernel queued so far: the GPU then idles while the host finishes the step, and the host cannot
queue the next step ahead of it (with CUDA graphs, the whole gap between two replays).

Where the model-parallel group has a single rank, both reductions are the identity. There
:func:`model_parallel_max` keeps a statistic that is a tensor on its device and
:func:`model_parallel_and` returns the flag without a device round trip; training_log then reads
the values with :func:`read_logged_statistics` on the iterations that log them. The logged
values are those upstream's reductions return: floats rounded to float32 (the dtype of the
reduction), ``None`` for a missing statistic. With more ranks both functions reduce as before.
"""

from typing import Optional, Union

import numpy
import torch

from megatron.training.utils.common_utils import (
    logical_and_across_model_parallel_group,
    reduce_max_stat_across_model_parallel_group,
)

Statistic = Union[None, float, torch.Tensor]


def _group_size(group: Optional[torch.distributed.ProcessGroup]) -> int:
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_model_parallel_group()
    return torch.distributed.get_world_size(group=group)


def model_parallel_max(
    stat: Statistic, group: Optional[torch.distributed.ProcessGroup] = None
) -> Statistic:
    """The maximum of ``stat`` over the model-parallel ``group`` (default: Megatron's).

    With one rank in the group a tensor is returned as it is (read it with
    :func:`read_logged_statistics`) and a number as upstream's reduction returns it (rounded to
    float32; ``None`` for -1, upstream's marker of a missing statistic). With more ranks this is
    ``reduce_max_stat_across_model_parallel_group``.
    """
    if _group_size(group) > 1:
        return reduce_max_stat_across_model_parallel_group(stat, group=group)
    if stat is None or isinstance(stat, torch.Tensor):
        return stat
    value = float(numpy.float32(stat))
    return None if value == -1.0 else value


def model_parallel_and(flag: bool, group: Optional[torch.distributed.ProcessGroup] = None) -> bool:
    """Whether ``flag`` is True on every rank of the model-parallel ``group``; with one rank,
    without a device round trip (as upstream, only the object ``True`` counts as true)."""
    if _group_size(group) > 1:
        return logical_and_across_model_parallel_group(flag, group=group)
    return flag is True


def read_logged_statistics(*stats: Statistic) -> tuple:
    """The host values of ``stats``: a tensor is read as float32 (one element), a number or None
    is returned as it is."""
    return tuple(
        stat.detach().float().item() if isinstance(stat, torch.Tensor) else stat for stat in stats
    )
