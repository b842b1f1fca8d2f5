# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""CPU tests of the Transformer Engine multiplier linears' own logic.

``megatron.core.extensions.transformer_engine_multipliers`` needs Transformer Engine (CUDA) to
import. Here its TE base classes are replaced by a minimal linear with TE's hooks
(``_get_weight_tensors``, ``forward`` returning ``(output, bias)``), so the choice between
folding the multipliers into the weight and scaling activations, and the values of each path,
are checked on CPU against the plain ``x W^T`` scaled as Falcon-H1 defines it. The real TE
path needs a GPU: a Falcon-H1 model built from the Transformer Engine spec, compared with HF.
"""

import importlib
import sys
import types

import pytest
import torch

from megatron.core.transformer.forward_multipliers import ForwardMultipliers
from megatron.core.transformer.transformer_config import TransformerConfig

MODULE = "megatron.core.extensions.transformer_engine_multipliers"


class _StandInTELinear(torch.nn.Module):
    """The attributes and hooks of a TE linear that the multiplier linears use."""

    def __init__(self, input_size, output_size, *, config, bias=False, tp_group=None):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = input_size, output_size
        self.tp_size, self._tp_group = 1, tp_group
        self.use_bias = bias
        self.fuse_wgrad_accumulation = False
        self.weight_names = ["weight"]
        self.weight = torch.nn.Parameter(torch.randn(output_size, input_size, dtype=torch.float64))
        self.weights_seen = []

    def _get_weight_tensors(self):
        return [self.weight]

    def forward(self, x):
        (weight,) = self._get_weight_tensors()
        self.weights_seen.append(weight)
        return x @ weight.t(), None


class TEColumnParallelLinear(_StandInTELinear):
    """Stand-in for TE's column-parallel linear."""


class TERowParallelLinear(_StandInTELinear):
    """Stand-in for TE's row-parallel linear."""


@pytest.fixture
def te_multipliers(monkeypatch):
    """The module under test, imported on top of the stand-in TE classes (and forgotten after)."""
    fake = types.ModuleType("megatron.core.extensions.transformer_engine")
    fake.TEColumnParallelLinear = TEColumnParallelLinear
    fake.TERowParallelLinear = TERowParallelLinear
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    module = importlib.import_module(MODULE)
    yield module
    sys.modules.pop(MODULE, None)


def _config():
    return TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=4,
        ffn_hidden_size=6,
        gated_linear_unit=True,
        mamba_num_heads=2,
        mamba_head_dim=4,
        mamba_num_groups=1,
        mamba_state_dim=3,
        add_bias_linear=False,
        key_multiplier=0.43,
        attention_in_multiplier=1.13,
        attention_out_multiplier=0.87,
        mlp_multipliers=[0.79, 1.41],
    )


def _expected(config, role, layer, x):
    """``x W^T`` scaled by the role's multipliers (float64, from the multiplier helper)."""
    fm = ForwardMultipliers(config, role, layer.out_features, 1)
    return fm.scale_output(x @ layer.weight.t())


@pytest.mark.parametrize(
    "kind, role, in_size, out_size",
    [
        ("column", "linear_qkv", 8, 16),  # per-channel (key multiplier) and attention_in
        ("column", "linear_fc1", 8, 12),  # per-channel (gate / up multipliers)
        ("row", "linear_proj", 8, 8),  # scalar attention_out
        ("row", "linear_fc2", 6, 8),  # scalar
    ],
)
@pytest.mark.parametrize("tokens", [3, 40])  # 3: scale activations, 40: fold into the weight
def test_fold_and_activation_paths_equal_the_definition(
    te_multipliers, kind, role, in_size, out_size, tokens
):
    config = _config()
    torch.manual_seed(0)
    cls = (
        te_multipliers.TEColumnParallelLinearWithMultipliers
        if kind == "column"
        else te_multipliers.TERowParallelLinearWithMultipliers
    )
    layer = cls(in_size, out_size, config=config, role=role)
    assert not layer.forward_multipliers.identity
    x = torch.randn(tokens, in_size, dtype=torch.float64, requires_grad=True)
    output, bias = layer(x)
    assert bias is None
    torch.testing.assert_close(output, _expected(config, role, layer, x), rtol=1e-12, atol=0)

    folded = tokens > max(in_size, out_size)
    assert (layer.weights_seen[-1] is not layer.weight) == folded, "fold decision"
    assert not layer._fold_into_weight, "the fold must end with its forward"
    assert layer._get_weight_tensors() == [layer.weight]

    # The weight gradient reaches the parameter, scaled back by autograd when folded.
    grad = torch.randn_like(output)
    output.backward(grad)
    reference = layer.weight.detach().clone().requires_grad_(True)
    ref_layer = types.SimpleNamespace(weight=reference, out_features=out_size)
    _expected(config, role, ref_layer, x.detach()).backward(grad)
    torch.testing.assert_close(layer.weight.grad, reference.grad, rtol=1e-12, atol=0)


def test_no_fold_with_fused_weight_gradient_accumulation(te_multipliers):
    config = _config()
    layer = te_multipliers.TEColumnParallelLinearWithMultipliers(
        8, 12, config=config, role="linear_fc1"
    )
    layer.fuse_wgrad_accumulation = True
    x = torch.randn(40, 8, dtype=torch.float64)
    output, _ = layer(x)
    assert layer.weights_seen[-1] is layer.weight
    expected = _expected(config, "linear_fc1", layer, x)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=0)


def test_module_imports_without_transformer_engine():
    """Without TE, upstream defines the TE classes on a mock base; the module still imports
    (the patch-set's per-commit import check and CPU-only users import it)."""
    pytest.importorskip("megatron.core.extensions.transformer_engine")
    sys.modules.pop(MODULE, None)
    try:
        module = importlib.import_module(MODULE)
        assert module.TEColumnParallelLinearWithMultipliers is not None
        assert module.TERowParallelLinearWithMultipliers is not None
    finally:
        sys.modules.pop(MODULE, None)
