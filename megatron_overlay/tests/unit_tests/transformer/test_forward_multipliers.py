# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Unit tests of megatron.core.transformer.forward_multipliers (single rank; on the CPU where the
tree trains on CPU, else on a GPU: see the ``single_rank`` fixture)."""

import pytest
import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.forward_multipliers import (
    FORWARD_MULTIPLIERS,
    ColumnParallelLinearWithMultipliers,
    RowParallelLinearWithMultipliers,
    check_forward_multipliers_applied,
    mamba_in_proj_output_multipliers,
    qkv_output_multipliers,
    role_is_identity,
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


def _column(cls, config, out, **kwargs):
    return cls(
        16,
        out,
        config=config,
        init_method=torch.nn.init.normal_,
        bias=False,
        gather_output=False,
        **kwargs,
    )


def test_defaults_are_identity_and_bit_identical(single_rank):
    device = single_rank
    config = _config()
    for role in ("linear_qkv", "mamba_in_proj", "linear_fc1", "linear_proj", "linear_fc2"):
        assert role_is_identity(config, role)
    torch.manual_seed(0)
    plain = _column(ColumnParallelLinear, config, 40).to(device)
    scaled = _column(ColumnParallelLinearWithMultipliers, config, 40, role="linear_fc1")
    scaled = scaled.to(device)
    scaled.load_state_dict(plain.state_dict())
    assert scaled.forward_multipliers.identity
    for tokens in (3, 40):  # activation-side and weight-side regimes
        x = torch.randn(tokens, 2, 16, device=device)
        assert torch.equal(plain(x)[0], scaled(x)[0])
    assert set(scaled.state_dict()) == set(plain.state_dict())  # no persistent extra state


def test_qkv_layout_scales_only_keys():
    config = _config(key_multiplier=0.5)
    vector = qkv_output_multipliers(config, local_out=2 * (2 + 2) * 6, tp_size=1)
    per_group = vector.view(2, 4, 6)  # groups x (2 query heads, key, value) x head_dim
    assert torch.all(per_group[:, :2] == 1.0)
    assert torch.all(per_group[:, 2] == 0.5)
    assert torch.all(per_group[:, 3] == 1.0)


def test_qkv_layout_with_output_gate_scales_only_keys():
    """--attention-output-gate puts a gate block between the query heads and the key: per
    group [q heads, gate heads, k, v]. 72 channels are also 3 groups of the ungated width
    (24), so only the layout, not the size check, can tell the two apart."""
    config = _config(key_multiplier=0.5, attention_output_gate=True)
    vector = qkv_output_multipliers(config, local_out=2 * (2 + 2 + 2) * 6, tp_size=1)
    per_group = vector.view(2, 6, 6)  # groups x (2 query, 2 gate, key, value) x head_dim
    assert torch.all(per_group[:, :4] == 1.0)
    assert torch.all(per_group[:, 4] == 0.5)
    assert torch.all(per_group[:, 5] == 1.0)
    with pytest.raises(ValueError, match="q, gate, k, v"):
        qkv_output_multipliers(config, local_out=2 * (2 + 2) * 6, tp_size=1)


def test_qkv_layout_with_more_ranks_than_query_groups():
    """With TP > query groups each rank holds an even slice of the fused QKV rows (as upstream's
    attention splits them before its all-gather): the ranks' vectors are consecutive slices of
    the whole layer's vector, so a rank may hold only query rows, or only a key and a value."""
    config = _config(key_multiplier=0.5)  # 2 groups of [2 query heads, key, value] x 6
    full = qkv_output_multipliers(config, local_out=2 * 4 * 6, tp_size=1)
    for tp in (4, 8):
        local = full.numel() // tp
        parts = [qkv_output_multipliers(config, local, tp, tp_rank=r) for r in range(tp)]
        assert torch.equal(torch.cat(parts), full)
    assert torch.all(parts[0] == 1.0)  # TP=8, rank 0: query rows only
    assert torch.all(parts[2] == 0.5) and torch.all(parts[3] == 1.0)  # key, then value
    with pytest.raises(ValueError, match="needs the rank"):
        qkv_output_multipliers(config, 12, 4)
    with pytest.raises(ValueError, match="must divide or be a multiple"):
        qkv_output_multipliers(config, 16, 3, tp_rank=0)


def _attention_model(config):
    from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(
        config=config,
        hybrid_stack_spec=falcon_h1_stack_spec,
        vocab_size=32,
        max_sequence_length=16,
        hybrid_layer_pattern="*",
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    ).eval()


def test_key_multiplier_with_output_gate_equals_scaled_key_weights(single_rank):
    """Through upstream's SelfAttention: x -> (x Wqkv^T) * key_mult on the key channels equals
    the model whose key rows of Wqkv are scaled (the gate and the query stay unscaled)."""
    device = single_rank
    key_mult = 0.43
    common = dict(
        num_layers=1, normalization="RMSNorm", attention_output_gate=True, is_hybrid_model=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        apply_rope_fusion=False, transformer_impl="local",
    )  # fmt: skip
    torch.manual_seed(0)
    scaled = _attention_model(_config(key_multiplier=key_mult, **common)).to(device)
    plain = _attention_model(_config(**common)).to(device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for param in scaled.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state = scaled.state_dict()
    qkv_name = "decoder.layers.0.self_attention.linear_qkv.weight"
    qkv = state[qkv_name].clone().view(2, 6, 6, 16)  # groups x (q, q, gate, gate, k, v) x ...
    qkv[:, 4] *= key_mult
    state[qkv_name] = qkv.view(-1, 16)
    plain.load_state_dict(state)
    tokens = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.arange(7, device=device).expand(2, -1)
    with torch.no_grad():
        got = scaled(tokens, positions, attention_mask=None)
        want = plain(tokens, positions, attention_mask=None)
    # fp32: (x W^T) * k and x (k W)^T round differently, so not bit-identical.
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    # Not vacuous: the same weights without the key multiplier give other logits.
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        unscaled = plain(tokens, positions, attention_mask=None)
    assert (unscaled - want).abs().max() > 0.1


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


@pytest.mark.parametrize("tp", [2, 4])
def test_mamba_in_proj_segments_with_more_ranks_than_groups(tp):
    """One Mamba group shared by ``tp`` ranks: each rank holds state_dim / tp rows of B and of
    C (a slice of the group), as of every other component."""
    config = _config(
        ssm_multipliers=[2.0, 3.0, 4.0, 5.0, 6.0], mamba_num_groups=1, mamba_state_dim=8
    )
    sizes = [4 * 3 // tp, 4 * 3 // tp, 8 // tp, 8 // tp, 4 // tp]
    vector = mamba_in_proj_output_multipliers(config, sum(sizes), tp_size=tp)
    for segment, value in zip(torch.split(vector, sizes), (2.0, 3.0, 4.0, 5.0, 6.0)):
        assert segment.numel() > 0 and torch.all(segment == value)
    # 2 groups x 5 state channels: not an even share at TP 4 or 3.
    for bad_tp in (4, 3):
        message = f"do not split evenly over --tensor-model-parallel-size {bad_tp}"
        with pytest.raises(ValueError, match=message):
            mamba_in_proj_output_multipliers(_config(ssm_multipliers=[2] * 5), 10, tp_size=bad_tp)


@pytest.mark.parametrize("tokens", [3, 40], ids=["scale-output", "scale-weight"])
def test_scaled_linears_match_explicit_formula(single_rank, tokens):
    """Both regimes (fewer tokens than input features: the output is scaled; more: the weight
    rows are) compute HF's formula (x * in_mult) W^T * out_mult * per-channel multipliers."""
    device = single_rank
    config = _config(
        mlp_multipliers=[0.25, 3.0], ssm_in_multiplier=1.5, ssm_multipliers=[2, 3, 4, 5, 6]
    )
    torch.manual_seed(0)
    fc1 = _column(ColumnParallelLinearWithMultipliers, config, 40, role="linear_fc1").to(device)
    x = torch.randn(tokens, 2, 16, device=device)
    y, _ = fc1(x)
    ref = x @ fc1.weight.t()
    scale = ref.abs().max().item()
    assert torch.allclose(y[..., :20], ref[..., :20] * 0.25, rtol=0, atol=1e-6 * scale)
    assert torch.allclose(y[..., 20:], ref[..., 20:], rtol=0, atol=1e-6 * scale)

    fc2 = RowParallelLinearWithMultipliers(
        20, 16, config=config, init_method=torch.nn.init.normal_, bias=False,
        input_is_parallel=True, skip_bias_add=True, role="linear_fc2",
    ).to(device)  # fmt: skip
    h = torch.randn(tokens, 2, 20, device=device)
    out, bias = fc2(h)
    assert bias is None
    assert torch.allclose(out, (h @ fc2.weight.t()) * 3.0)

    in_proj = _column(ColumnParallelLinearWithMultipliers, config, 48, role="mamba_in_proj")
    in_proj = in_proj.to(device)
    y, _ = in_proj(x)
    vector = mamba_in_proj_output_multipliers(config, 48, tp_size=1).to(device)
    expected = (x * 1.5) @ in_proj.weight.t() * vector
    # fp32: the scales combine in another order than the formula's; round-off relative to the
    # output scale (entries that cancel to ~0 carry the absolute error of the large terms).
    assert torch.allclose(y, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("tokens", [3, 40], ids=["scale-output", "scale-weight"])
def test_scaled_linear_gradients(single_rank, tokens):
    """Input and weight gradients equal those of the explicit formula in both regimes."""
    device = single_rank
    config = _config(ssm_in_multiplier=1.5, ssm_multipliers=[2, 3, 4, 5, 6])
    torch.manual_seed(0)
    in_proj = _column(ColumnParallelLinearWithMultipliers, config, 48, role="mamba_in_proj")
    in_proj = in_proj.to(device)
    vector = mamba_in_proj_output_multipliers(config, 48, tp_size=1).to(device)
    x = torch.randn(tokens, 2, 16, device=device, requires_grad=True)
    grad = torch.randn(tokens, 2, 48, device=device)
    in_proj(x)[0].backward(grad)
    weight = in_proj.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref * 1.5) @ weight.t() * vector).backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(in_proj.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)


def test_multipliers_are_not_buffers(single_rank):
    """Derived from the config: no buffers, so CUDA-graph capture's in-place restore of module
    buffers after warm-up cannot touch a tensor autograd saved (--cuda-graph-impl local)."""
    config = _config(mlp_multipliers=[0.25, 3.0], key_multiplier=0.5)
    fc1 = _column(ColumnParallelLinearWithMultipliers, config, 40, role="linear_fc1")
    qkv = _column(ColumnParallelLinearWithMultipliers, config, 48, role="linear_qkv")
    assert list(fc1.buffers()) == [] and list(qkv.buffers()) == []


def test_table_matches_the_config_fields():
    """Every multiplier of the table is a TransformerConfig field whose CLI arity is its count."""
    fields = TransformerConfig.__dataclass_fields__
    for mult in FORWARD_MULTIPLIERS:
        assert mult.name in fields, mult.name
        nargs = fields[mult.name].metadata.get("argparse_meta", {}).get("nargs")
        assert (nargs or 1) == mult.count, (mult.name, nargs)
        assert mult.flag == "--" + mult.name.replace("_", "-")
    assert sum(m.count for m in FORWARD_MULTIPLIERS) == 14


def test_check_unites_the_chunks_of_a_rank(single_rank):
    """Virtual-pipeline chunks: a multiplier applied by any chunk of the rank is applied."""
    config = _config(key_multiplier=0.5, mlp_multipliers=[0.25, 1.0])
    qkv = _column(ColumnParallelLinearWithMultipliers, config, 48, role="linear_qkv")
    fc1 = _column(ColumnParallelLinearWithMultipliers, config, 40, role="linear_fc1")
    check_forward_multipliers_applied([qkv, fc1], config)
    with pytest.raises(ValueError, match="--key-multiplier is set"):
        check_forward_multipliers_applied([fc1], config)
    with pytest.raises(ValueError, match="--mlp-multipliers is set"):
        check_forward_multipliers_applied(qkv, config)
    plain = _column(ColumnParallelLinear, _config(), 40)
    check_forward_multipliers_applied(plain, _config(lm_head_multiplier=0.5))  # not a layer one


def test_unknown_role_is_refused(single_rank):
    with pytest.raises(ValueError, match="unknown forward-multiplier role"):
        _column(ColumnParallelLinearWithMultipliers, _config(), 40, role="nope")


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
