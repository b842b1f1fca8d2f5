# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Mamba-2 B / C groups under tensor parallelism, including more TP ranks than groups.

Mamba-2's ``in_proj`` produces, besides ``z``, ``x`` and ``dt`` (one slice per head), the ``B``
and ``C`` projections of ``ngroups`` groups of ``d_state`` channels; every head reads the B / C
of its group. ``MambaMixer`` splits the heads evenly over the TP ranks. With ``tp <= ngroups``
(``ngroups % tp == 0``) a rank holds whole groups together with their heads, as upstream always
required. With ``tp > ngroups`` (``tp % ngroups == 0``; Falcon-H1 releases have one group),
``tp / ngroups`` consecutive ranks hold the heads of one group. Then:

* Storage: the B and C rows of ``in_proj`` (and their conv1d channels and biases) are split
  evenly over the TP ranks, exactly like the rows of any column-parallel weight: a rank stores
  ``ngroups * d_state / tp`` rows of B (a slice of its group) and as many of C. Every parameter
  element lives on one rank, so data parallelism, the distributed optimizer, gradient clipping
  and checkpoints need nothing special: ``sharded_state_dict`` keeps the global ``B`` / ``C``
  tensors of any TP size, and checkpoints reshard between TP sizes.
* Compute: after the projection the ranks sharing a group all-gather its B / C channels
  (:meth:`MambaGroupSharing.gather_in_proj`), and the B / C conv1d weights and biases likewise
  (:meth:`MambaGroupSharing.gather_conv`). The backward of the gather reduce-scatters, so the
  gradient of each stored slice is the sum over every rank that used it. From there on each
  rank sees one whole group (``ngroups_local == 1``): the scan, the convolution and the decode
  steps run unchanged.
* The gated RMSNorm normalises groups of ``d_inner / ngroups`` channels, which are now split
  over the sharing ranks: their sums of squares are all-reduced among them
  (:meth:`MambaGroupSharing.group_sum`, forward and backward).

Upstream's attention does the same for more TP ranks than query groups (the fused QKV rows are
split evenly and all-gathered). The cost is one all-gather of ``2 * ngroups * d_state``
channels per token and layer (and its reduce-scatter in backward), small next to the hidden
size that sequence parallelism gathers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.utils import get_pg_rank, get_pg_size


class _GatherGroupSlices(torch.autograd.Function):
    """All-gather ``[T, S, w]`` over ``group``; keep ranks ``first .. first + count - 1``.

    Output ``[T, S, count * w]``: for each of the ``S`` segments, the ``w`` channels of those
    ranks concatenated in rank order. Backward: the gradient goes back to every rank's slice and
    is summed over the ranks that used it (a reduce-scatter).
    """

    @staticmethod
    def forward(ctx, local, group, first, count):
        """See the class docstring."""
        tp = get_pg_size(group)
        tokens, segments, width = local.shape
        gathered = local.new_empty((tp * tokens, segments, width))
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
        ctx.group, ctx.first, ctx.count, ctx.tp = group, first, count, tp
        mine = gathered.view(tp, tokens, segments, width)[first : first + count]
        return mine.permute(1, 2, 0, 3).reshape(tokens, segments, count * width)

    @staticmethod
    def backward(ctx, grad):
        """Sum each slice's gradient over the ranks that used it."""
        tokens, segments, used = grad.shape
        width = used // ctx.count
        full = grad.new_zeros((ctx.tp, tokens, segments, width))
        full[ctx.first : ctx.first + ctx.count] = grad.reshape(
            tokens, segments, ctx.count, width
        ).permute(2, 0, 1, 3)
        out = grad.new_empty((tokens, segments, width))
        dist.reduce_scatter_tensor(
            out, full.view(ctx.tp * tokens, segments, width), group=ctx.group
        )
        return out, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces too: every rank uses the summed value."""

    @staticmethod
    def forward(ctx, tensor, group):
        """Sum ``tensor`` over ``group``."""
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        """The gradient of each rank's summand is the sum of every rank's output gradient."""
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class MambaGroupSharing:
    """How one TP rank's Mamba heads, B / C channels and norm groups relate (see the module).

    Args:
        ngroups: Mamba groups (``--mamba-num-groups``).
        nheads: Mamba heads (``--mamba-num-heads``).
        d_state: state size (``--mamba-state-dim``), the B / C channels per group.
        d_inner_local: Mamba channels (heads x head_dim) of this rank.
        tp_group: tensor-parallel group.

    Raises:
        ValueError: see :func:`check_mamba_parallel_sizes`.
    """

    def __init__(
        self, ngroups: int, nheads: int, d_state: int, d_inner_local: int, tp_group
    ) -> None:
        tp = get_pg_size(tp_group)
        self.tp_group = tp_group
        self.tp_size = tp
        self.d_state = d_state
        self.d_inner_local = d_inner_local
        self.nheads = nheads
        self.nheads_local = nheads // tp
        problem = check_mamba_parallel_sizes(nheads, ngroups, d_state, tp)
        if problem is not None:
            raise ValueError(problem)
        #: Ranks holding the heads of one group (1: every rank holds whole groups).
        self.ranks_per_group = max(tp // ngroups, 1)
        #: Groups whose B / C this rank uses.
        self.ngroups_local = max(ngroups // tp, 1)
        #: B (or C) rows of in_proj / channels of conv1d that this rank stores.
        self.bc_dim_local = ngroups * d_state // tp
        #: B (or C) channels this rank uses (after the gather).
        self.bc_dim_used = self.ngroups_local * d_state
        rank = get_pg_rank(tp_group)
        #: Group of this rank's heads, when groups are shared.
        self.group_index = rank // self.ranks_per_group
        self.first_rank = self.group_index * self.ranks_per_group
        self.ngroups = ngroups

    @property
    def shared(self) -> bool:
        """True when several ranks share a group (TP > ngroups)."""
        return self.ranks_per_group > 1

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return _GatherGroupSlices.apply(local, self.tp_group, self.first_rank, self.ranks_per_group)

    def gather_in_proj(self, zxBCdt: torch.Tensor) -> torch.Tensor:
        """``[..., z x B C dt]`` with this rank's stored B / C slices -> the same with the whole
        group's B / C (identity unless groups are shared)."""
        if not self.shared:
            return zxBCdt
        d, w, h = self.d_inner_local, self.bc_dim_local, self.nheads_local
        zx, bc, dt = torch.split(zxBCdt, [2 * d, 2 * w, h], dim=-1)
        lead = bc.shape[:-1]
        used = self._gather(bc.reshape(-1, 2, w)).reshape(*lead, 2 * self.bc_dim_used)
        return torch.cat([zx, used, dt], dim=-1)

    def gather_conv(self, param: torch.Tensor) -> torch.Tensor:
        """A conv1d weight ``[x B C, 1, width]`` or bias ``[x B C]`` of this rank -> the one of
        the whole group's channels (identity unless groups are shared)."""
        if not self.shared:
            return param
        d, w = self.d_inner_local, self.bc_dim_local
        x, bc = torch.split(param, [d, 2 * w], dim=0)
        tail = bc.shape[1:]
        # channels last: [2 * w, *tail] -> [prod(tail), 2, w]
        moved = bc.reshape(2, w, -1).permute(2, 0, 1)
        used = self._gather(moved)  # [prod(tail), 2, used]
        used = used.permute(1, 2, 0).reshape(2 * self.bc_dim_used, *tail)
        return torch.cat([x, used], dim=0)

    @property
    def conv_dim_used(self) -> int:
        """Conv1d channels (x, B, C) this rank convolves."""
        return self.d_inner_local + 2 * self.bc_dim_used

    def group_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum ``partial`` (a per-token statistic of this rank's channels of its group) over the
        ranks sharing the group; gradients flow back to every summand."""
        if self.ngroups == 1:
            return _AllReduceSum.apply(partial, self.tp_group)
        # One slot per group: a rank adds its value to its group's slot only.
        onehot = partial.new_zeros(self.ngroups)
        onehot[self.group_index] = 1.0
        slots = _AllReduceSum.apply(partial * onehot, self.tp_group)
        return slots[..., self.group_index : self.group_index + 1]

    def configure_norm(self, norm: torch.nn.Module) -> None:
        """Make the gated RMSNorm ``norm`` (group size = this rank's channels) reduce its sums
        of squares over the ranks sharing a group (nothing to do unless groups are shared)."""
        if self.shared:
            norm.share_group_across_ranks(self.group_sum, self.d_inner_local * self.ranks_per_group)

    def context_parallel(self, cp_group, **kwargs) -> MambaContextParallel:
        """``MambaContextParallel`` for this rank, fed the group's gathered conv1d weights.

        Raises:
            ValueError: the heads or groups cannot be split over the context-parallel ranks.
        """
        problem = check_mamba_parallel_sizes(
            self.nheads, self.ngroups, self.d_state, self.tp_size, get_pg_size(cp_group)
        )
        if problem is not None:
            raise ValueError(problem)
        return _GroupSharingContextParallel(self, cp_group=cp_group, **kwargs)


class _GroupSharingContextParallel(MambaContextParallel):
    """``MambaContextParallel`` whose conv1d weight / bias are the whole group's."""

    def __init__(self, sharing: MambaGroupSharing, **kwargs):
        super().__init__(**kwargs)
        self.sharing = sharing

    def get_conv1d_weight(self) -> torch.Tensor:
        """The group's conv1d weight, sliced for this context-parallel rank."""
        return self._slice_conv_param(self.sharing.gather_conv(self.conv1d_weight_cp1))

    def get_conv1d_bias(self) -> torch.Tensor:
        """The group's conv1d bias, sliced for this context-parallel rank."""
        return self._slice_conv_param(self.sharing.gather_conv(self.conv1d_bias_cp1))


def check_mamba_group_sharing(ngroups: int, d_state: int, tp_size: int) -> Optional[str]:
    """Why ``ngroups`` Mamba groups of ``d_state`` channels cannot be split over ``tp_size``
    tensor-parallel ranks, or None when they can (see :class:`MambaGroupSharing`)."""
    if ngroups % tp_size == 0:
        return None
    if tp_size % ngroups != 0:
        return (
            f"--tensor-model-parallel-size {tp_size} must divide --mamba-num-groups {ngroups} "
            "or be a multiple of it (the Mamba heads of one rank must belong to one group)"
        )
    share = tp_size // ngroups
    if d_state % share != 0:
        return (
            f"--tensor-model-parallel-size {tp_size} shares each of the {ngroups} Mamba "
            f"group(s) between {share} ranks, which split its B / C channels evenly: "
            f"--mamba-state-dim {d_state} must be divisible by {share}"
        )
    return None


def check_mamba_parallel_sizes(
    nheads: int, ngroups: int, d_state: int, tp_size: int, cp_size: int = 1
) -> Optional[str]:
    """Why a Mamba layer of ``nheads`` heads in ``ngroups`` groups of ``d_state`` channels
    cannot run at tensor-parallel size ``tp_size`` and context-parallel size ``cp_size``, naming
    the flags and the sizes that would work; None when it can."""
    if nheads % tp_size == 0 and nheads % ngroups != 0:
        return (
            f"--mamba-num-heads {nheads} must be a multiple of --mamba-num-groups {ngroups} "
            "(every group has the same number of heads)"
        )
    if nheads % tp_size != 0 or check_mamba_group_sharing(ngroups, d_state, tp_size):
        allowed = [
            t
            for t in range(1, nheads + 1)
            if nheads % t == 0 and check_mamba_group_sharing(ngroups, d_state, t) is None
        ]
        reason = check_mamba_group_sharing(ngroups, d_state, tp_size)
        if nheads % tp_size != 0:
            reason = (
                f"--tensor-model-parallel-size {tp_size} must divide --mamba-num-heads {nheads} "
                "(every rank holds the same number of Mamba heads)"
            )
        return f"{reason}; allowed tensor-parallel sizes for this Mamba layer: {allowed}"
    if cp_size == 1:
        return None
    heads_local = nheads // tp_size
    if heads_local % cp_size != 0:
        allowed = [c for c in range(1, heads_local + 1) if heads_local % c == 0]
        return (
            f"--context-parallel-size {cp_size} must divide the {heads_local} Mamba heads of a "
            f"tensor-parallel rank (--mamba-num-heads {nheads} / --tensor-model-parallel-size "
            f"{tp_size}): context parallelism gives each rank a share of them; allowed "
            f"context-parallel sizes at this TP: {allowed}"
        )
    groups_local = max(ngroups // tp_size, 1)
    if groups_local % cp_size != 0 and cp_size % groups_local != 0:
        return (
            f"--context-parallel-size {cp_size} must divide or be a multiple of the "
            f"{groups_local} Mamba groups of a tensor-parallel rank (--mamba-num-groups "
            f"{ngroups} / --tensor-model-parallel-size {tp_size})"
        )
    return None
