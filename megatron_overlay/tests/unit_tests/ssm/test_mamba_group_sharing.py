# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Size checks of Mamba groups under tensor and context parallelism (CPU, single rank)."""

import pytest

from megatron.core.ssm.mamba_group_sharing import MambaGroupSharing, check_mamba_parallel_sizes
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)


class _Group:
    """Stands in for a process group of ``size`` ranks in which this process is rank 0."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        """Ranks in the group."""
        return self._size

    def rank(self) -> int:
        """This process's rank in the group."""
        return 0


@pytest.mark.parametrize(
    "nheads,ngroups,tp,cp",
    [(24, 1, 1, 2), (24, 1, 4, 2), (24, 1, 8, 3), (8, 2, 2, 1), (8, 2, 1, 2), (8, 2, 4, 2)],
)
def test_sizes_that_split(nheads, ngroups, tp, cp):
    assert check_mamba_parallel_sizes(nheads, ngroups, 16, tp, cp) is None


@pytest.mark.parametrize(
    "nheads,ngroups,tp,cp,message",
    [
        (24, 1, 8, 2, "--context-parallel-size 2 must divide the 3 Mamba heads"),
        (24, 1, 1, 5, "allowed context-parallel sizes at this TP: [1, 2, 3, 4, 6, 8, 12, 24]"),
        (12, 3, 1, 2, "--context-parallel-size 2 must divide or be a multiple of the 3 Mamba"),
        (24, 1, 5, 1, "--tensor-model-parallel-size 5 must divide --mamba-num-heads 24"),
    ],
)
def test_sizes_that_do_not_split_name_the_flags(nheads, ngroups, tp, cp, message):
    problem = check_mamba_parallel_sizes(nheads, ngroups, 16, tp, cp)
    assert problem is not None and message in problem


def test_context_parallel_refuses_heads_it_cannot_split(single_rank):
    """The layer itself refuses, not only the launcher's pre-check: 24 heads at TP 8 leave 3
    per rank, which 2 CP ranks cannot share."""
    sharing = MambaGroupSharing(
        ngroups=1, nheads=24, d_state=16, d_inner_local=3 * 16, tp_group=_Group(8)
    )
    assert sharing.shared and sharing.ranks_per_group == 8
    with pytest.raises(ValueError, match="--context-parallel-size 2 must divide the 3 Mamba"):
        sharing.context_parallel(_Group(2))


def test_tensor_parallel_refuses_heads_it_cannot_split(single_rank):
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 5 must divide"):
        MambaGroupSharing(ngroups=1, nheads=24, d_state=16, d_inner_local=16, tp_group=_Group(5))
