"""Shared fixtures for falcon-mcore's project tests.

Tests that need Megatron import it from the patched tree ``build/Megatron-LM`` (made by
``make apply-patches``; ``$FALCON_MCORE_BUILD`` overrides the path). They run on CPU with a
single-process gloo group unless they spawn their own workers.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The project's one import helper (scripts/lib/project_paths.py); tests import project code
# through it and the functions below, never by sys.path insertions of their own.
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from project_paths import megatron_tree, use  # noqa: E402

BUILD = megatron_tree()
# Test helper modules are imported as top-level names (tests/ is not a package: the patched
# tree on sys.path has a `tests` package of its own).
use("tests")


def megatron_path() -> Path:
    """Path of the patched tree, put first on sys.path; fails clearly when it is missing."""
    if not (BUILD / "megatron" / "core").is_dir():
        pytest.fail(f"{BUILD} is not a patched Megatron tree: run `make apply-patches` first")
    use("megatron")
    return BUILD


def checkpoint_tool(name: str) -> ModuleType:
    """Module ``name`` of the patched tree's ``tools/checkpoint`` (the converters)."""
    megatron_path()
    use("checkpoint_tools")
    return importlib.import_module(name)


@pytest.fixture
def megatron_tree() -> Path:
    return megatron_path()


@pytest.fixture
def single_rank_model_parallel(megatron_tree, tmp_path):
    """gloo world of size 1 with Megatron model-parallel state (TP=PP=1) and seeded RNGs."""
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = False
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'dist_init'}", world_size=1, rank=0
        )
        created = True
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
