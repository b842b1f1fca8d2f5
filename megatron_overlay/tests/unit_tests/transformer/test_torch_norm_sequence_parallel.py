# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""WrappedTorchNorm under sequence parallelism (CPU, single rank, gloo)."""

import pytest
import torch

from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)


def _config(**kwargs):
    return TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True, **kwargs
    )


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sequence_parallel_marks_norm_params(single_rank, normalization):
    """Under sequence parallelism every parameter of the norm is marked ``sequence_parallel``,
    so finalize_model_grads all-reduces its partial gradients over the TP group; without it
    the norm is the plain torch module, unmarked."""
    norm = WrappedTorchNorm(
        _config(sequence_parallel=True, tensor_model_parallel_size=2, normalization=normalization),
        hidden_size=8,
    )
    params = list(norm.parameters())
    assert params and all(getattr(p, "sequence_parallel", False) for p in params)
    plain = WrappedTorchNorm(_config(normalization=normalization), hidden_size=8)
    assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())
    x = torch.randn(3, 2, 8)
    assert torch.equal(norm(x), plain(x))
