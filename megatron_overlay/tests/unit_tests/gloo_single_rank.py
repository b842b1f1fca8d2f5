# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Fixture for CPU unit tests: a one-process gloo world with Megatron's model-parallel state."""

import pytest
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


@pytest.fixture
def single_rank(tmp_path):
    """gloo world of size 1, TP = PP = 1, seeded RNG trackers (works without CUDA)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0
        )
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
