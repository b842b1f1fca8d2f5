# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Fixture for single-rank unit tests: Megatron's model-parallel state on the device the tree
can test on.

* Where the tree trains on CPU (it has ``megatron.core.device_utils`` and the pure-PyTorch
  Mamba-2 ops ``megatron.core.ssm.mamba2_torch``): a one-process gloo world on the CPU.
* Otherwise, with a CUDA GPU: upstream's test utilities (``Utils.initialize_model_parallel``,
  NCCL), as upstream's GPU unit tests run.
* Otherwise the test is skipped, with the reason.

The fixture's value is the device on which tests put their models and inputs.
"""

import importlib.util

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

# Modules of a tree that trains on CPU: device-neutral allocation and the torch Mamba-2 ops.
CPU_TRAINING_MODULES = ("megatron.core.device_utils", "megatron.core.ssm.mamba2_torch")

NO_DEVICE_REASON = (
    "needs a CUDA GPU, or a tree that trains on CPU (" + " and ".join(CPU_TRAINING_MODULES) + ")"
)


def cpu_training_supported() -> bool:
    """True where the tree can build and run models (Mamba layers included) on the CPU."""
    return all(importlib.util.find_spec(name) is not None for name in CPU_TRAINING_MODULES)


# For tests that start CPU ranks over gloo themselves (multi-process tests).
requires_cpu_training = pytest.mark.skipif(
    not cpu_training_supported(),
    reason="starts CPU ranks over gloo: needs a tree that trains on CPU ("
    + " and ".join(CPU_TRAINING_MODULES)
    + ")",
)


# Transformer Engine's attention selection variables: upstream's autouse ``set_env`` fixture
# sets two to 0 where TE is installed, and a language model built with the default attention
# backend refuses them (upstream's ``Utils.initialize_model_parallel`` clears them too).
NVTE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@pytest.fixture
def single_rank(tmp_path, monkeypatch):
    """A world of size 1, TP = PP = 1, seeded RNG trackers; yields the test device."""
    for name in NVTE_ATTENTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if cpu_training_supported():
        created = not dist.is_initialized()
        if created:
            dist.init_process_group(
                "gloo", init_method=f"file://{tmp_path / 'init'}", world_size=1, rank=0
            )
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(123)
        yield torch.device("cpu")
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
        return
    if not torch.cuda.is_available():
        pytest.skip(NO_DEVICE_REASON)
    from tests.unit_tests.test_utilities import Utils

    Utils.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)
    yield torch.device("cuda", torch.cuda.current_device())
    Utils.destroy_model_parallel()
