# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Falcon-H1 configuration mapping: HF ``config.json`` <-> model settings <-> Megatron arguments.

:func:`parse_hf_config` validates an HF ``FalconH1Config`` (every key this converter does not
implement exactly is refused) and returns :class:`HFSettings`; :func:`hf_config_from_settings`
writes it back. :func:`megatron_model_flags` gives the ``pretrain_hybrid.py`` flags of the
settings, :func:`settings_from_megatron_args` reads them back from a checkpoint's args.

Of Megatron, only the table of forward multipliers is imported: the 14 multipliers keep the
names of their ``TransformerConfig`` fields, which are also the HF config keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from conversion_io import ConversionError, arg_mismatches, arg_value
from falcon_h1_layouts import FalconH1Dims
from falcon_h1_parallel import hybrid_layer_pattern, pattern_layer_counts

from megatron.core.transformer.forward_multipliers import FORWARD_MULTIPLIERS

# The fourteen Falcon-H1 multipliers in nine fields (same names in HF and Megatron), from
# Megatron's one table of them.
SCALAR_MULTIPLIERS = tuple(m.name for m in FORWARD_MULTIPLIERS if m.count == 1)
LIST_MULTIPLIERS = {m.name: m.count for m in FORWARD_MULTIPLIERS if m.count > 1}

# HF keys that define the model; absent keys take transformers' FalconH1Config defaults.
_HF_DEFAULTS = {
    "num_key_value_heads": None,  # -> num_attention_heads
    "head_dim": None,  # -> hidden_size // num_attention_heads
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "attention_dropout": 0.0,
    "mamba_d_ssm": 1024,
    "mamba_d_head": "auto",
    "mamba_n_groups": 1,
    "mamba_d_state": 256,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 256,
    "mamba_rms_norm": False,
}
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mamba_n_heads",
)
# Keys whose value must be the one Megatron's Falcon-H1 layer implements: key -> (default when
# absent, accepted values, what Megatron does).
_HF_FIXED = {
    "hidden_act": ("silu", ("silu",), "a SiLU-gated MLP"),
    "tie_word_embeddings": (False, (False,), "an untied output layer"),
    "mamba_conv_bias": (True, (True,), "a Mamba conv1d with bias"),
    "mamba_proj_bias": (False, (False,), "Mamba projections without bias"),
    "mamba_norm_before_gate": (True, (False,), "the gated norm with norm_before_gate=False"),
    "projectors_bias": (False, (False,), "projections without bias"),
    "attention_bias": (False, (False,), "attention projections without bias"),
    "mlp_bias": (False, (False,), "MLP projections without bias"),
    "attn_layer_indices": (None, (None,), "attention in every layer"),
    "mamba_use_mlp": (True, (True,), "an MLP in every layer"),
    "rope_scaling": (None, (None,), "plain RoPE (no scaling)"),
    "model_type": ("falcon_h1", ("falcon_h1",), "Falcon-H1"),
}
# Keys that do not change the weights or the forward pass; carried over unchanged.
_HF_PASSTHROUGH = frozenset(
    {
        "architectures",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "use_cache",
        "initializer_range",
        "num_logits_to_keep",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "mlp_expansion_factor",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "time_step_rank",
        "tokenizer_class",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "is_encoder_decoder",
        "chunk_size_feed_forward",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "max_length",
    }
)
_HF_MODEL_KEYS = (
    set(_HF_DEFAULTS)
    | set(_HF_REQUIRED)
    | set(SCALAR_MULTIPLIERS)
    | set(LIST_MULTIPLIERS)
    | {"rope_theta", "rope_parameters", "time_step_limit"}
)


def _is_inf(value) -> bool:
    if isinstance(value, dict):  # transformers >= 5 writes {"__float__": "Infinity"}
        return value.get("__float__") in ("Infinity", "inf")
    return isinstance(value, (int, float)) and math.isinf(value) and value > 0


@dataclass(frozen=True)
class HFSettings:
    """Model settings of an HF Falcon-H1 config beyond the tensor shapes."""

    dims: FalconH1Dims
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    mamba_chunk_size: int
    attention_dropout: float
    multipliers: Dict[str, object]


def parse_hf_config(config: Mapping, allow_unknown_keys: bool = False) -> HFSettings:
    """Validate an HF Falcon-H1 ``config.json`` and return its settings.

    Raises :class:`ConversionError` for missing required keys, values Megatron's Falcon-H1
    layer does not implement, inconsistent Mamba sizes and (unless ``allow_unknown_keys``)
    keys this converter does not know.
    """
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
        hint = ""
        if method == "bitnet":
            hint = (
                ": this is a BitNet export (tools/checkpoint/bitnet_hf_export.py writes it from a "
                "Megatron "
                "--use-bitnet checkpoint; load that checkpoint to train on)"
            )
        raise ConversionError(
            f"quantized HF checkpoints (quantization_config, quant_method {method!r}) are not "
            f"supported{hint}"
        )
    missing = [k for k in _HF_REQUIRED if config.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks required key(s): {', '.join(missing)}")
    known = _HF_MODEL_KEYS | set(_HF_FIXED) | _HF_PASSTHROUGH
    unknown = sorted(k for k in config if k not in known)
    if unknown and not allow_unknown_keys:
        raise ConversionError(
            f"config.json has key(s) this converter does not know: {', '.join(unknown)}. They "
            "may change the model, so the conversion would not be exact; pass "
            "--allow-unknown-config-keys to carry them over unchanged if they do not."
        )
    arch = config.get("architectures")
    if arch is not None and "FalconH1ForCausalLM" not in arch:
        raise ConversionError(f"architectures is {arch!r}, expected FalconH1ForCausalLM")
    for key, (default, accepted, meaning) in _HF_FIXED.items():
        value = config.get(key, default)
        if key == "rope_scaling" and isinstance(value, dict):
            value = None if value.get("rope_type", value.get("type")) == "default" else value
        if value not in accepted:
            raise ConversionError(
                f"unsupported config value {key}={value!r}: Megatron's Falcon-H1 layer "
                f"implements {meaning} ({key} in {list(accepted)!r})"
            )
    limit = config.get("time_step_limit")
    if limit is not None and not (len(limit) == 2 and float(limit[0]) == 0.0 and _is_inf(limit[1])):
        raise ConversionError(
            f"unsupported time_step_limit={limit!r}: Megatron's Mamba mixer uses (0, inf)"
        )

    def get(key):
        return config[key] if config.get(key) is not None else _HF_DEFAULTS.get(key)

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden // heads)
    mamba_heads = int(config["mamba_n_heads"])
    if config.get("mamba_d_ssm") is None and "mamba_d_ssm" in config:
        # explicit null: HF uses expand * hidden (expand may be fractional, e.g. 1.5)
        expand = float(get("mamba_expand"))
        d_ssm = expand * hidden
        if d_ssm != int(d_ssm):
            raise ConversionError(
                f"mamba_expand ({expand!r}) x hidden_size ({hidden}) = {d_ssm!r} is not a whole "
                "number of Mamba channels (mamba_d_ssm is null)"
            )
        d_ssm = int(d_ssm)
    else:
        d_ssm = int(get("mamba_d_ssm"))
    d_head = get("mamba_d_head")
    d_head = d_ssm // mamba_heads if d_head == "auto" else int(d_head)
    if mamba_heads * d_head != d_ssm:
        raise ConversionError(
            f"inconsistent Mamba sizes: mamba_n_heads ({mamba_heads}) x mamba_d_head ({d_head})"
            f" != mamba_d_ssm ({d_ssm})"
        )
    groups = int(get("mamba_n_groups"))
    if mamba_heads % groups:
        raise ConversionError(f"mamba_n_heads ({mamba_heads}) is not divisible by n_groups")
    if heads % kv_heads:
        raise ConversionError(
            f"num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv_heads})"
        )

    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"unsupported rope_parameters {rope!r}: plain RoPE only")
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    else:
        theta = float(config.get("rope_theta", 10000.0))
    if theta != int(theta):
        raise ConversionError(f"rope_theta {theta!r} is not an integer (Megatron's rotary_base)")

    multipliers: Dict[str, object] = {}
    for name in SCALAR_MULTIPLIERS:
        value = config.get(name)
        multipliers[name] = 1.0 if value is None else float(value)
    for name, count in LIST_MULTIPLIERS.items():
        value = config.get(name)
        value = [1.0] * count if value is None else [float(v) for v in value]
        if len(value) != count:
            raise ConversionError(f"{name} must have {count} values, got {value!r}")
        multipliers[name] = value

    dims = FalconH1Dims(
        num_layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        ffn=int(config["intermediate_size"]),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(config["vocab_size"]),
        mamba_heads=mamba_heads,
        mamba_head_dim=d_head,
        mamba_groups=groups,
        d_state=int(get("mamba_d_state")),
        conv_kernel=int(get("mamba_d_conv")),
        mamba_rms_norm=bool(get("mamba_rms_norm")),
    )
    return HFSettings(
        dims=dims,
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        max_position_embeddings=int(get("max_position_embeddings")),
        mamba_chunk_size=int(get("mamba_chunk_size")),
        attention_dropout=float(get("attention_dropout") or 0.0),
        multipliers=multipliers,
    )


def hf_config_from_settings(settings: HFSettings, base: Optional[Mapping] = None) -> dict:
    """HF ``config.json`` content for ``settings``.

    ``base`` (the config the model was converted from, if known) provides every key that does
    not define the model (token ids, ``auto_map``, ...); model keys are overwritten from
    ``settings``, so converting a config there and back returns it unchanged.
    """
    d = settings.dims
    out = dict(base) if base is not None else {}
    out.setdefault("architectures", ["FalconH1ForCausalLM"])
    out["model_type"] = "falcon_h1"
    values = {
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": settings.rms_norm_eps,
        "max_position_embeddings": settings.max_position_embeddings,
        "attention_dropout": settings.attention_dropout,
        "mamba_d_ssm": d.d_ssm,
        "mamba_n_heads": d.mamba_heads,
        "mamba_d_head": d.mamba_head_dim,
        "mamba_n_groups": d.mamba_groups,
        "mamba_d_state": d.d_state,
        "mamba_d_conv": d.conv_kernel,
        "mamba_chunk_size": settings.mamba_chunk_size,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_norm_before_gate": False,
        "mamba_rms_norm": d.mamba_rms_norm,
        "projectors_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    if "mamba_expand" not in out and d.d_ssm % d.hidden == 0:
        values["mamba_expand"] = d.d_ssm // d.hidden
    for name in SCALAR_MULTIPLIERS:
        values[name] = settings.multipliers[name]
    for name in LIST_MULTIPLIERS:
        values[name] = list(settings.multipliers[name])
    out.update(values)
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = dict(out["rope_parameters"], rope_theta=settings.rope_theta)
    else:
        out["rope_theta"] = settings.rope_theta
        out.setdefault("rope_scaling", None)
    return out


# --------------------------------------------------------------------------------------------
# Megatron arguments
# --------------------------------------------------------------------------------------------

# Name under which the converter records the source HF config.json in the Megatron args.
HF_CONFIG_ARG = "falcon_h1_hf_config"


def megatron_model_flags(settings: HFSettings, pipeline_counts: Sequence[int]) -> List[str]:
    """Megatron command-line flags describing the model of ``settings`` (``pretrain_hybrid.py``
    / ``pretrain_mamba.py`` names). Floats are passed as ``repr`` so they parse back exactly."""
    d = settings.dims
    m = settings.multipliers
    flags = [
        "--hybrid-layer-pattern", hybrid_layer_pattern(pipeline_counts),
        "--hidden-size", str(d.hidden),
        "--ffn-hidden-size", str(d.ffn),
        "--num-attention-heads", str(d.heads),
        "--group-query-attention",
        "--num-query-groups", str(d.kv_heads),
        "--kv-channels", str(d.head_dim),
        "--swiglu",
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(settings.rms_norm_eps),
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--position-embedding-type", "rope",
        "--rotary-base", str(int(settings.rope_theta)),
        "--rotary-percent", "1.0",
        "--max-position-embeddings", str(settings.max_position_embeddings),
        "--attention-dropout", repr(settings.attention_dropout),
        "--hidden-dropout", "0.0",
        "--mamba-num-heads", str(d.mamba_heads),
        "--mamba-head-dim", str(d.mamba_head_dim),
        "--mamba-num-groups", str(d.mamba_groups),
        "--mamba-state-dim", str(d.d_state),
        "--mamba-chunk-size", str(settings.mamba_chunk_size),
        "--mamba-conv-kernel", str(d.conv_kernel),
    ]  # fmt: skip
    if not d.mamba_rms_norm:
        flags.append("--no-mamba-rms-norm")
    for name in SCALAR_MULTIPLIERS:
        flags += ["--" + name.replace("_", "-"), repr(float(m[name]))]
    for name in LIST_MULTIPLIERS:
        flags += ["--" + name.replace("_", "-")] + [repr(float(v)) for v in m[name]]
    return flags


# Megatron arguments of a Falcon-H1 model: (name, value[, default when absent]).
_FALCON_H1_ARGS = (
    ("swiglu", True),
    ("normalization", "RMSNorm"),
    ("add_bias_linear", False),
    ("add_qkv_bias", False, False),
    ("untie_embeddings_and_output_weights", True),
    ("position_embedding_type", "rope"),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_interleaved", False, False),
    ("qk_layernorm", False, False),
    ("attention_output_gate", False, False),
    ("apply_layernorm_1p", False, False),
    ("num_experts", None),
    ("use_rope_scaling", False, False),
)


def settings_from_megatron_args(args, vocab: Optional[int] = None) -> Tuple[HFSettings, List[int]]:
    """HF settings of the Falcon-H1 model that Megatron ``args`` describe, and the layers of
    each pipeline stage. ``vocab`` (the unpadded vocabulary) defaults to the recorded HF
    config's, then ``args.vocab_size``.

    Raises :class:`ConversionError` when the args describe something else than a Falcon-H1
    stack of parallel hybrid layers.
    """
    problems = arg_mismatches(args, _FALCON_H1_ARGS, "Falcon-H1 needs")
    if getattr(args, "mtp_num_layers", None):
        problems.append(f"mtp_num_layers={args.mtp_num_layers} (Falcon-H1 has no MTP)")
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        problems.append("virtual pipeline parallelism is not supported")
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if not pattern:
        problems.append("hybrid_layer_pattern is not set (Falcon-H1 is a 'P'-layer stack)")
    if problems:
        raise ConversionError(
            "the checkpoint is not a Falcon-H1 model this converter supports: "
            + "; ".join(problems)
        )
    pp = int(arg_value(args, "pipeline_model_parallel_size", 1))
    counts = pattern_layer_counts(pattern, pp)

    if vocab is None:
        vocab = (getattr(args, HF_CONFIG_ARG, None) or {}).get("vocab_size")
    if vocab is None:
        vocab = getattr(args, "unpadded_vocab_size", None)
    if vocab is None:
        vocab = getattr(args, "vocab_size", None)
    if vocab is None:
        raise ConversionError(
            "the checkpoint does not record the unpadded vocabulary size; pass --vocab-size or "
            "--hf-config"
        )
    hidden = int(args.hidden_size)
    heads = int(args.num_attention_heads)
    kv_heads = (
        int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    )
    head_dim = int(arg_value(args, "kv_channels", hidden // heads))
    mamba_head_dim = int(args.mamba_head_dim)
    mamba_heads = getattr(args, "mamba_num_heads", None)
    if mamba_heads is None:
        mamba_heads = 2 * hidden // mamba_head_dim  # MambaMixer's default expand=2
    multipliers: Dict[str, object] = {}
    for name in SCALAR_MULTIPLIERS:
        multipliers[name] = float(arg_value(args, name, 1.0))
    for name, count in LIST_MULTIPLIERS.items():
        multipliers[name] = [float(v) for v in arg_value(args, name, [1.0] * count)]
    dims = FalconH1Dims(
        num_layers=sum(counts),
        hidden=hidden,
        ffn=int(args.ffn_hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(vocab),
        mamba_heads=int(mamba_heads),
        mamba_head_dim=mamba_head_dim,
        mamba_groups=int(args.mamba_num_groups),
        d_state=int(args.mamba_state_dim),
        conv_kernel=int(arg_value(args, "mamba_conv_kernel", 4)),
        mamba_rms_norm=bool(arg_value(args, "mamba_rms_norm", True)),
    )
    settings = HFSettings(
        dims=dims,
        rms_norm_eps=float(arg_value(args, "layernorm_epsilon", 1e-5)),
        rope_theta=float(arg_value(args, "rotary_base", 10000)),
        max_position_embeddings=int(args.max_position_embeddings),
        mamba_chunk_size=int(arg_value(args, "mamba_chunk_size", 128)),
        attention_dropout=float(arg_value(args, "attention_dropout", 0.0)),
        multipliers=multipliers,
    )
    return settings, counts
