# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Fixture of the optimizer tests: a one-rank world on a GPU (NCCL), or on CPU (gloo) where the
tree has Megatron's CPU training support; skipped otherwise."""

import importlib.util

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state


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
