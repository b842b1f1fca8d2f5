"""Model settings taken as the config says: Mamba's gated-norm epsilon and width, and the
converter's refusal of a layout it cannot export.

* The gated RMSNorm uses the model's norm epsilon (``--norm-epsilon`` = HF ``rms_norm_eps``),
  not a fixed 1e-5: with ``rms_norm_eps = 1e-2`` a tiny Falcon-H1 still matches HF's logits.
* A fractional ``mamba_expand`` is multiplied, not truncated: the converter reads
  ``mamba_expand = 1.5`` (with ``mamba_d_ssm: null``) as 1.5 x hidden channels, as HF does, and
  refuses an expand whose product is not a whole number; ``MambaMixer`` refuses a fractional
  ``expand x hidden_size`` instead of silently truncating it.
* megatron-to-hf refuses a checkpoint trained with ``--attention-output-gate`` (its fused QKV
  holds gate rows that FalconH1 has no place for) instead of misreading the layout.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import checkpoint_tool, megatron_path
from falcon_h1.oracle import (
    MULTIPLIERS,
    TinyShape,
    build_hf_model,
    build_megatron_model,
    hf_to_megatron_state_dict,
    megatron_config,
)

pytestmark = pytest.mark.megatron


@pytest.mark.parametrize("mem_eff_path", [True, False])
def test_gated_norm_epsilon_is_the_model_norm_epsilon(single_rank_model_parallel, mem_eff_path):
    # 1e-2 is large against the mean square of y * silu(z) here: with the old fixed 1e-5 the
    # Megatron logits differed from HF's by 1.6 (the round-off bound below is 1e-5).
    shape = TinyShape(eps=1e-2, rms_norm=True)
    hf = build_hf_model(shape, MULTIPLIERS)
    config = megatron_config(shape, MULTIPLIERS, use_mamba_mem_eff_path=mem_eff_path)
    mg = build_megatron_model(shape, config)
    for layer in mg.decoder.layers:
        assert layer.self_attention.mamba.norm.eps == 1e-2
    missing, unexpected = mg.load_state_dict(
        hf_to_megatron_state_dict(hf.state_dict(), shape), strict=False
    )
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, shape.vocab, (2, 21), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(21).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens).logits
        mg_logits = mg(input_ids=tokens, position_ids=positions, attention_mask=None)
    diff = (mg_logits - hf_logits).abs().max().item()
    assert diff <= 1e-5, f"logits max abs diff {diff:.3e}"


@pytest.fixture(scope="module")
def mapping():
    return checkpoint_tool("falcon_h1_config")


def _hf_config(**overrides):
    config = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=6,
        mamba_d_ssm=None,
        mamba_d_head="auto",
        mamba_norm_before_gate=False,
    )
    config.update(overrides)
    return config


def test_converter_multiplies_a_fractional_mamba_expand(mapping):
    dims = mapping.parse_hf_config(_hf_config(mamba_expand=1.5)).dims
    assert (dims.d_ssm, dims.mamba_head_dim) == (96, 16)  # 1.5 x 64, HF: int(expand * hidden)
    dims = mapping.parse_hf_config(_hf_config(mamba_expand=2, mamba_n_heads=8)).dims
    assert dims.d_ssm == 128
    with pytest.raises(mapping.ConversionError, match=r"mamba_expand \(1\.3\) x hidden_size"):
        mapping.parse_hf_config(_hf_config(mamba_expand=1.3))


def _mixer(single_config, expand):
    from megatron.core.models.hybrid.hybrid_backend_specs import (
        LocalSDPASpecProvider,
        get_mamba_mixer_spec_for_backend,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    spec = get_mamba_mixer_spec_for_backend(LocalSDPASpecProvider())
    return build_module(
        spec,
        single_config,
        d_model=single_config.hidden_size,
        expand=expand,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def test_mamba_mixer_width_from_a_fractional_expand(single_rank_model_parallel):
    from megatron.core.transformer.transformer_config import TransformerConfig

    def config(hidden, heads, head_dim, groups):
        return TransformerConfig(
            num_layers=1, hidden_size=hidden, num_attention_heads=heads, mamba_head_dim=head_dim,
            mamba_num_groups=groups, mamba_state_dim=8, use_cpu_initialization=True,
        )  # fmt: skip

    mixer = _mixer(config(32, 4, 8, 2), expand=1.5)
    assert (mixer.d_inner, mixer.nheads) == (48, 6)
    assert mixer.in_proj.weight.shape[0] == 2 * 48 + 2 * 2 * 8 + 6
    # 1.5 x 33 = 49.5 channels: the old code silently built int(49.5) = 49 (7 heads of 7).
    with pytest.raises(ValueError, match=r"expand \(1\.5\) x hidden size \(33\) = 49\.5"):
        _mixer(config(33, 3, 7, 1), expand=1.5)


def test_converter_refuses_attention_output_gate(mapping):
    tools = megatron_path() / "tools" / "checkpoint"
    import falcon_h1_conversion as tool

    assert str(tools) in sys.path
    settings = mapping.parse_hf_config(_hf_config(mamba_d_ssm=96, mamba_expand=None))
    flags = mapping.megatron_model_flags(settings, [2]) + [
        "--micro-batch-size", "1", "--seq-length", "16", "--transformer-impl", "local",
    ]  # fmt: skip
    args = tool.build_megatron_args(flags, world_size=1)
    assert mapping.settings_from_megatron_args(args, 128)[0].dims == settings.dims
    gated = tool.build_megatron_args(flags + ["--attention-output-gate"], world_size=1)
    assert gated.attention_output_gate is True
    with pytest.raises(mapping.ConversionError, match="attention_output_gate=True"):
        mapping.settings_from_megatron_args(gated, 128)
