# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Backend selection rules."""

import pytest
import torch

from megatron.core.bitnet import functional as F


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("BITNET_BACKEND", raising=False)
    assert F.resolve_backend(torch.zeros(1)) == "torch"
    assert F.resolve_backend(torch.zeros(1), "auto") == "torch"


def test_env_forces_torch(monkeypatch):
    monkeypatch.setenv("BITNET_BACKEND", "torch")
    assert F.resolve_backend(torch.zeros(1)) == "torch"
    if torch.cuda.is_available():
        assert F.resolve_backend(torch.zeros(1, device="cuda")) == "torch"


def test_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("BITNET_BACKEND", "triton")
    assert F.resolve_backend(torch.zeros(1), "torch") == "torch"


def test_invalid_backend_name():
    with pytest.raises(ValueError, match="backend"):
        F.resolve_backend(torch.zeros(1), "cuda")


def test_triton_on_cpu_requires_interpreter():
    if not F.triton_available():
        with pytest.raises(RuntimeError, match="failed to import"):
            F.resolve_backend(torch.zeros(1), "triton")
    elif F._interpret():
        assert F.resolve_backend(torch.zeros(1), "triton") == "triton"
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            F.resolve_backend(torch.zeros(1), "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_is_triton(monkeypatch):
    monkeypatch.delenv("BITNET_BACKEND", raising=False)
    expected = "triton" if F.triton_available() else "torch"
    assert F.resolve_backend(torch.zeros(1, device="cuda")) == expected


def test_impl_choice_validation(monkeypatch):
    monkeypatch.delenv("BITNET_DGRAD", raising=False)
    monkeypatch.delenv("BITNET_WGRAD", raising=False)
    assert F.dgrad_impl() == "cublas" and F.wgrad_impl() == "cublas"
    monkeypatch.setenv("BITNET_DGRAD", "bogus")
    with pytest.raises(ValueError, match="BITNET_DGRAD"):
        F.dgrad_impl()
    monkeypatch.setenv("BITNET_DGRAD", " Cublas_Cached ")
    assert F.dgrad_impl() == "cublas_cached"
    # the cached dense copy exists only for the input gradient
    monkeypatch.setenv("BITNET_WGRAD", "cublas_cached")
    with pytest.raises(ValueError, match="BITNET_WGRAD"):
        F.wgrad_impl()
    monkeypatch.setenv("BITNET_WGRAD", "cublas")
    assert F.wgrad_impl() == "cublas"
