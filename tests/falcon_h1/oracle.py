"""Tiny Falcon-H1 models built twice: in HF transformers (the oracle) and in Megatron.

Oracle rules (DESIGN.md section 3): fp32, eager attention, head_dim != hidden / heads, n_groups
1 and 2, both mamba_rms_norm values, a sequence length that is not a multiple of the chunk size,
all 14 multipliers distinct and != 1, randomised A_log / D / dt_bias / norm weights, no padding
mask, and HF's non-release defaults (rope theta, norm_before_gate, chunk) set explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from project_paths import load_script, use

# All 14 multipliers distinct and != 1: the overlay tests' values, loaded by path (that module
# imports nothing). Falcon-H1-0.5B's release multipliers: the launchers' preset.
MULTIPLIERS = load_script(
    "megatron_overlay/tests/unit_tests/ssm/falcon_h1_multipliers.py", "falcon_h1_test_multipliers"
).MULTIPLIERS
use("falcon_h1_scripts")
from falcon_h1_args import MULTIPLIERS_0_5B  # noqa: E402  pylint: disable=wrong-import-position


@dataclass
class TinyShape:
    """Shape of a tiny Falcon-H1 (head_dim 24 != hidden 64 / 4 heads)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24
    ffn: int = 96
    vocab: int = 128
    mamba_heads: int = 8
    mamba_head_dim: int = 16
    mamba_groups: int = 1
    d_state: int = 16
    chunk: int = 8
    conv: int = 4
    rms_norm: bool = True
    eps: float = 1e-5
    rope_theta: float = 1e11


def hf_config(shape: TinyShape, multipliers: dict = MULTIPLIERS):
    """``FalconH1Config`` of the tiny model."""
    from transformers import FalconH1Config

    config = FalconH1Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        rms_norm_eps=shape.eps,
        max_position_embeddings=256,
        mamba_d_ssm=shape.mamba_heads * shape.mamba_head_dim,
        mamba_n_heads=shape.mamba_heads,
        mamba_d_head=shape.mamba_head_dim,
        mamba_n_groups=shape.mamba_groups,
        mamba_d_state=shape.d_state,
        mamba_d_conv=shape.conv,
        mamba_chunk_size=shape.chunk,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        mamba_norm_before_gate=False,
        mamba_rms_norm=shape.rms_norm,
        projectors_bias=False,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        pad_token_id=None,  # no padding row: its embedding would get no gradient in HF
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        attn_implementation="eager",
        **multipliers,
    )
    config._attn_implementation = "eager"
    return config


def build_hf_model(shape: TinyShape, multipliers: dict = MULTIPLIERS, seed: int = 0):
    """HF ``FalconH1ForCausalLM`` in fp32 with randomised SSM parameters and norm weights."""
    from transformers import FalconH1ForCausalLM

    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(hf_config(shape, multipliers)).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=generator) * 2.0 - 0.5)
            elif name.endswith(".D") or name.endswith("dt_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    return model


def megatron_config(shape: TinyShape, multipliers: dict = MULTIPLIERS, **overrides):
    """``TransformerConfig`` equal to ``hf_config(shape, multipliers)``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = dict(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=shape.eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        is_hybrid_model=True,
        mamba_num_heads=shape.mamba_heads,
        mamba_head_dim=shape.mamba_head_dim,
        mamba_num_groups=shape.mamba_groups,
        mamba_state_dim=shape.d_state,
        mamba_chunk_size=shape.chunk,
        mamba_conv_kernel=shape.conv,
        mamba_rms_norm=shape.rms_norm,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        transformer_impl="local",
        **multipliers,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def build_megatron_model(
    shape: TinyShape, config, pattern: str | None = None, transformer_impl: str = "local"
):
    """Megatron ``HybridModel`` with the Falcon-H1 spec of ``transformer_impl`` (local or
    transformer_engine) and pattern ``P`` x layers."""
    from megatron.core.models.hybrid.falcon_h1_layer_specs import (
        get_falcon_h1_stack_spec_for_impl,
    )
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(
        config=config,
        hybrid_stack_spec=get_falcon_h1_stack_spec_for_impl(transformer_impl),
        vocab_size=shape.vocab,
        max_sequence_length=256,
        hybrid_layer_pattern=pattern or "P" * shape.layers,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
    ).float()


def hf_to_megatron_state_dict(hf_state: dict, shape: TinyShape) -> dict:
    """Map an HF Falcon-H1 state dict to Megatron names and layouts (TP = PP = 1)."""
    out = {
        "embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "decoder.final_norm.weight": hf_state["model.final_layernorm.weight"],
        "output_layer.weight": hf_state["lm_head.weight"],
    }
    per_group = shape.heads // shape.kv_heads
    d = shape.head_dim
    for i in range(shape.layers):
        hf = f"model.layers.{i}."
        mg = f"decoder.layers.{i}."
        q = hf_state[hf + "self_attn.q_proj.weight"].view(shape.kv_heads, per_group * d, -1)
        k = hf_state[hf + "self_attn.k_proj.weight"].view(shape.kv_heads, d, -1)
        v = hf_state[hf + "self_attn.v_proj.weight"].view(shape.kv_heads, d, -1)
        out[mg + "self_attention.attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(
            -1, shape.hidden
        )
        out[mg + "self_attention.attention.linear_proj.weight"] = hf_state[
            hf + "self_attn.o_proj.weight"
        ]
        out[mg + "input_layernorm.weight"] = hf_state[hf + "input_layernorm.weight"]
        out[mg + "pre_mlp_layernorm.weight"] = hf_state[hf + "pre_ff_layernorm.weight"]
        out[mg + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[hf + "feed_forward.gate_proj.weight"], hf_state[hf + "feed_forward.up_proj.weight"]]
        )
        out[mg + "mlp.linear_fc2.weight"] = hf_state[hf + "feed_forward.down_proj.weight"]
        m = mg + "self_attention.mamba."
        out[m + "in_proj.weight"] = hf_state[hf + "mamba.in_proj.weight"]
        out[m + "out_proj.weight"] = hf_state[hf + "mamba.out_proj.weight"]
        out[m + "conv1d_weight"] = hf_state[hf + "mamba.conv1d.weight"]
        out[m + "conv1d_bias"] = hf_state[hf + "mamba.conv1d.bias"]
        for name in ("dt_bias", "A_log", "D"):
            out[m + name] = hf_state[hf + f"mamba.{name}"]
        if shape.rms_norm:
            out[m + "norm.weight"] = hf_state[hf + "mamba.norm.weight"]
    return out


def load_hf_weights(model, hf_state: dict, shape: TinyShape) -> None:
    """Load HF weights into a Megatron model built by ``build_megatron_model``, strictly.

    Every Megatron parameter and persistent buffer must come from the mapping (only TE/extra
    ``_extra_state`` entries may be missing) and every mapped tensor must be used; otherwise a
    ``ValueError`` lists the missing and unexpected keys.
    """
    mapped = hf_to_megatron_state_dict(hf_state, shape)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"HF -> Megatron weights do not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
