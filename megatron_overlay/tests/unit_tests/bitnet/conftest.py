# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Test setup for megatron.core.bitnet: the ``gpu`` marker.

Tests marked ``gpu`` need a CUDA device (they also skip without one); ``-m "not gpu"`` leaves
them out of a CPU-only run.

Without CUDA, the Triton kernel tests run in Triton's CPU interpreter when the run starts with
``TRITON_INTERPRET=1`` in the environment (Triton decides compiled vs interpreted when it is
first imported, which this tree's ``tests/unit_tests/conftest.py`` already does); otherwise they
skip with that hint.
"""


def pytest_configure(config):
    """Register the ``gpu`` marker."""
    config.addinivalue_line("markers", "gpu: test needs a CUDA GPU (skipped without one)")
