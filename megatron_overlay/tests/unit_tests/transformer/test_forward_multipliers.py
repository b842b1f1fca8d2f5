# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Unit tests of megatron.core.transformer.forward_multipliers (CPU, single rank, gloo)."""

import pytest
import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.forward_multipliers import (
    ForwardMultiplierMixin,
    mamba_in_proj_output_multipliers,
    qkv_output_multipliers,
    role_is_identity,
    with_forward_multipliers,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)


def _config(**kwargs):
    values = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=6,
        ffn_hidden_size=20,
        gated_linear_unit=True,
        mamba_num_heads=4,
        mamba_head_dim=3,
        mamba_num_groups=2,
        mamba_state_dim=5,
        use_cpu_initialization=True,
        add_bias_linear=False,
    )
    values.update(kwargs)
    return TransformerConfig(**values)


def _column(cls, config, out):
    return cls(
        16, out, config=config, init_method=torch.nn.init.normal_, bias=False, gather_output=False
    )


def test_defaults_are_identity_and_bit_identical(single_rank):
    config = _config()
    for role in ("linear_qkv", "mamba_in_proj", "linear_fc1", "linear_proj", "linear_fc2"):
        assert role_is_identity(config, role)
    torch.manual_seed(0)
    plain = _column(ColumnParallelLinear, config, 40)
    scaled = _column(with_forward_multipliers(ColumnParallelLinear, "linear_fc1"), config, 40)
    scaled.load_state_dict(plain.state_dict())
    assert not scaled.forward_multipliers_active
    x = torch.randn(3, 2, 16)
    assert torch.equal(plain(x)[0], scaled(x)[0])
    assert set(scaled.state_dict()) == set(plain.state_dict())  # no persistent extra state


def test_qkv_layout_scales_only_keys():
    config = _config(key_multiplier=0.5)
    vector = qkv_output_multipliers(config, local_out=2 * (2 + 2) * 6, tp_size=1)
    per_group = vector.view(2, 4, 6)  # groups x (2 query heads, key, value) x head_dim
    assert torch.all(per_group[:, :2] == 1.0)
    assert torch.all(per_group[:, 2] == 0.5)
    assert torch.all(per_group[:, 3] == 1.0)


def test_mamba_in_proj_segments():
    config = _config(ssm_multipliers=[2.0, 3.0, 4.0, 5.0, 6.0])
    d_inner, groups_state, heads = 4 * 3, 2 * 5, 4
    local_out = 2 * d_inner + 2 * groups_state + heads
    vector = mamba_in_proj_output_multipliers(config, local_out, tp_size=1)
    sizes = [d_inner, d_inner, groups_state, groups_state, heads]
    for segment, value in zip(torch.split(vector, sizes), (2.0, 3.0, 4.0, 5.0, 6.0)):
        assert torch.all(segment == value)
    # Per-rank layout at TP=2: every segment halves.
    half = mamba_in_proj_output_multipliers(config, local_out // 2, tp_size=2)
    for segment, value in zip(torch.split(half, [n // 2 for n in sizes]), (2, 3, 4, 5, 6)):
        assert torch.all(segment == value)


def test_scaled_linears_match_explicit_formula(single_rank):
    config = _config(mlp_multipliers=[0.25, 3.0], ssm_in_multiplier=1.5, ssm_multipliers=[2, 3, 4, 5, 6])
    torch.manual_seed(0)
    fc1 = _column(with_forward_multipliers(ColumnParallelLinear, "linear_fc1"), config, 40)
    x = torch.randn(3, 2, 16)
    y, _ = fc1(x)
    ref = x @ fc1.weight.t()
    assert torch.allclose(y[..., :20], ref[..., :20] * 0.25)
    assert torch.equal(y[..., 20:], ref[..., 20:])

    fc2 = with_forward_multipliers(RowParallelLinear, "linear_fc2")(
        20, 16, config=config, init_method=torch.nn.init.normal_, bias=False,
        input_is_parallel=True, skip_bias_add=True,
    )
    h = torch.randn(3, 2, 20)
    out, bias = fc2(h)
    assert bias is None
    assert torch.allclose(out, (h @ fc2.weight.t()) * 3.0)

    in_proj = _column(with_forward_multipliers(ColumnParallelLinear, "mamba_in_proj"), config, 48)
    y, _ = in_proj(x)
    expected = (x * 1.5) @ in_proj.weight.t() * in_proj.output_multiplier_vector
    assert torch.allclose(y, expected)


def test_classes_are_cached_and_importable():
    a = with_forward_multipliers(ColumnParallelLinear, "linear_qkv")
    assert a is with_forward_multipliers(ColumnParallelLinear, "linear_qkv")
    assert issubclass(a, ForwardMultiplierMixin) and issubclass(a, ColumnParallelLinear)
    import megatron.core.transformer.forward_multipliers as fm

    assert getattr(fm, a.__name__) is a
    with pytest.raises(ValueError, match="unknown forward-multiplier role"):
        with_forward_multipliers(ColumnParallelLinear, "nope")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ssm_multipliers=[1.0, 2.0]), "--ssm-multipliers takes exactly 5"),
        (dict(mlp_multipliers=[1.0]), "--mlp-multipliers takes exactly 2"),
        (dict(key_multiplier=float("nan")), "--key-multiplier must be a finite number"),
        (dict(key_multiplier=2.0, qk_layernorm=True), "--qk-layernorm"),
        (dict(mlp_multipliers=[2.0, 1.0], gated_linear_unit=False), "--swiglu"),
        (dict(mamba_chunk_size=0), "--mamba-chunk-size"),
    ],
)
def test_config_validation_names_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)
