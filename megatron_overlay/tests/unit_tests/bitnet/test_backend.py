# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Backend selection rules and the kernel-choice arguments of the BitNet ops."""

import pytest
import torch

from megatron.core.bitnet import functional as F


def test_auto_on_cpu_is_torch():
    assert F.resolve_backend(torch.zeros(1)) == "torch"
    assert F.resolve_backend(torch.zeros(1), "auto") == "torch"


def test_torch_is_forced():
    assert F.resolve_backend(torch.zeros(1), "torch") == "torch"
    if torch.cuda.is_available():
        assert F.resolve_backend(torch.zeros(1, device="cuda"), "torch") == "torch"


def test_environment_does_not_choose(monkeypatch):
    """The backend is an argument (the layers pass --bitnet-backend), never the environment."""
    monkeypatch.setenv("BITNET_BACKEND", "triton")
    assert F.resolve_backend(torch.zeros(1)) == "torch"
    assert F.resolve_backend(torch.zeros(1), "torch") == "torch"


def test_invalid_backend_name():
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton; got 'cuda'"):
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
def test_auto_on_cuda_is_triton():
    expected = "triton" if F.triton_available() else "torch"
    assert F.resolve_backend(torch.zeros(1, device="cuda")) == expected


def test_impl_choice_validation():
    x = torch.ones(2, 8)
    w = torch.nn.Parameter(torch.ones(4, 8))
    assert F.DGRAD_IMPLS == ("cublas", "cublas_cached", "triton")
    assert F.WGRAD_IMPLS == ("cublas", "triton")
    for dgrad in F.DGRAD_IMPLS:
        for wgrad in F.WGRAD_IMPLS:
            F.bitnet_linear(x, w, backend="torch", dgrad=dgrad, wgrad=wgrad).sum().backward()
    with pytest.raises(ValueError, match="dgrad must be one of cublas, cublas_cached, triton"):
        F.bitnet_linear(x, w, backend="torch", dgrad="bogus")
    # the cached dense copy exists only for the input gradient
    with pytest.raises(
        ValueError, match="wgrad must be one of cublas, triton; got 'cublas_cached'"
    ):
        F.bitnet_linear(x, w, backend="torch", wgrad="cublas_cached")
    act = F.quantize_activation(x, backend="torch")
    with pytest.raises(ValueError, match="wgrad must be one of"):
        F.bitnet_weight_grad(torch.ones(2, 4), act, backend="torch", wgrad="Cublas")
    with pytest.raises(ValueError, match="dgrad must be one of"):
        F.bitnet_input_grad(torch.ones(2, 4), F.quantize_weight(w, backend="torch"), dgrad="")
