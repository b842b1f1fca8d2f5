# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Falcon-H1 checkpoint layouts: HF transformers <-> Megatron, as pure tensor functions.

Of Megatron, only the table of forward multipliers is imported; everything else is a function of
tensors and plain config values, so the layouts can be tested on their own and reused by other
tools.

HF ``FalconH1ForCausalLM`` (transformers >= 4.53) names, per layer ``model.layers.{i}.``::

    input_layernorm.weight [h]            pre_ff_layernorm.weight [h]
    self_attn.{q,k,v,o}_proj.weight       feed_forward.{gate,up,down}_proj.weight
    mamba.in_proj.weight [2*d_ssm + 2*G*N + nh, h]   (rows: z | x | B | C | dt)
    mamba.conv1d.weight [d_ssm + 2*G*N, 1, k]        (rows: x | B | C), mamba.conv1d.bias
    mamba.dt_bias [nh], mamba.A_log [nh], mamba.D [nh], mamba.norm.weight [d_ssm] (if
    mamba_rms_norm), mamba.out_proj.weight [h, d_ssm]

plus ``model.embed_tokens.weight``, ``model.final_layernorm.weight`` and ``lm_head.weight``.

Megatron ``HybridModel`` with the Falcon-H1 stack (pattern ``P`` per layer), per TP rank ``r``
of ``t`` (names under ``decoder.layers.{local i}.``):

* ``self_attention.attention.linear_qkv.weight``: per query group ``[q heads; k; v]``, groups
  concatenated; rank ``r`` holds the ``r``-th of ``t`` equal row blocks: query groups
  ``r*KV/t ... (r+1)*KV/t - 1`` when ``t`` divides ``KV``, else a slice of one group (``t`` a
  multiple of ``KV``; Megatron's attention all-gathers the fused QKV then).
* ``self_attention.mamba.in_proj.weight``: ``[z_r; x_r; B_r; C_r; dt_r]``: each of the five
  components is split on its own, then the rank's pieces are concatenated. ``conv1d_weight`` /
  ``conv1d_bias``: ``[x_r; B_r; C_r]``. B and C are split evenly too: whole groups when ``t``
  divides ``G``, else (``t`` a multiple of ``G``) a slice of the group of the rank's heads,
  which the ranks sharing it gather at run time.
* ``mlp.linear_fc1.weight``: ``[gate_r; up_r]``.
* Row-parallel weights (``linear_proj``, ``out_proj``, ``linear_fc2``) split on dim 1;
  ``dt_bias``, ``A_log``, ``D``, ``norm.weight`` split on dim 0; norms replicated.
* ``embedding.word_embeddings.weight`` / ``output_layer.weight``: vocabulary padded with zero
  rows to ``padded_vocab`` (a multiple of ``make_vocab_size_divisible_by * t``), then split.

Megatron's ``torch_dist`` format stores global tensors, independent of TP and PP: layers keyed
by global index, ``in_proj.weight`` as five tensors ``.z .x .B .C .dt``, ``conv1d.{weight,bias}``
as ``.x .B .C``, ``linear_fc1.weight`` as ``[gate; up]`` and ``linear_qkv.weight`` in the
interleaved-per-group layout (see :func:`torch_dist_layer_keys`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron.core.transformer.forward_multipliers import FORWARD_MULTIPLIERS

Tensor = torch.Tensor


class ConversionError(ValueError):
    """A checkpoint or configuration this converter cannot convert exactly."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

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
class FalconH1Dims:
    """Shapes of a Falcon-H1 model (everything the tensor layouts depend on)."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    d_state: int
    conv_kernel: int
    mamba_rms_norm: bool

    @property
    def d_ssm(self) -> int:
        """Width of the Mamba inner dimension (``mamba_n_heads * mamba_d_head``)."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def group_state(self) -> int:
        """Rows of B (or C) in ``in_proj``: ``n_groups * d_state``."""
        return self.mamba_groups * self.d_state

    def in_proj_sizes(self) -> List[int]:
        """Row counts of the z, x, B, C, dt components of ``in_proj``."""
        gs = self.group_state
        return [self.d_ssm, self.d_ssm, gs, gs, self.mamba_heads]

    def conv_sizes(self) -> List[int]:
        """Row counts of the x, B, C components of ``conv1d``."""
        gs = self.group_state
        return [self.d_ssm, gs, gs]

    def to_dict(self) -> dict:
        return asdict(self)


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
# Parallel layout
# --------------------------------------------------------------------------------------------


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def check_tensor_parallel(dims: FalconH1Dims, tp: int) -> None:
    """Raise :class:`ConversionError` if ``dims`` cannot be split ``tp`` ways exactly.

    TP must divide the attention heads, Mamba heads and FFN size. The KV heads and the Mamba
    groups may also be fewer than TP ranks when TP is a multiple of them: every component is
    split evenly over the ranks all the same (a rank then holds a slice of one query group's
    fused QKV rows, or of one Mamba group's B / C rows, which Megatron gathers at run time), so
    ``d_state`` must split evenly over the ranks sharing a group.
    """
    if tp < 1:
        raise ConversionError(f"tensor parallel size must be >= 1, got {tp}")
    checks = [
        ("num_attention_heads", dims.heads),
        ("mamba_n_heads", dims.mamba_heads),
        ("intermediate_size", dims.ffn),
    ]
    bad = [f"{name}={value}" for name, value in checks if value % tp]
    for name, value in (
        ("num_key_value_heads (query groups)", dims.kv_heads),
        ("mamba_n_groups", dims.mamba_groups),
    ):
        if value % tp and tp % value:
            bad.append(f"{name}={value} (nor is TP a multiple of it)")
    if bad:
        raise ConversionError(f"TP={tp} does not divide {', '.join(bad)}.")
    if dims.mamba_groups < tp and dims.d_state % (tp // dims.mamba_groups):
        raise ConversionError(
            f"TP={tp} shares each of the {dims.mamba_groups} Mamba group(s) between "
            f"{tp // dims.mamba_groups} ranks, which split its mamba_d_state={dims.d_state} "
            "B / C rows evenly; it must be divisible by that number."
        )


def pipeline_layer_counts(
    num_layers: int, pp: int, layers_per_stage: Optional[Sequence[int]] = None
) -> List[int]:
    """Layers of each pipeline stage: ``layers_per_stage`` if given, else an even split."""
    if pp < 1:
        raise ConversionError(f"pipeline parallel size must be >= 1, got {pp}")
    if layers_per_stage is not None:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
            raise ConversionError(
                f"pipeline layer split {counts} must have {pp} positive entries summing to "
                f"{num_layers}"
            )
        return counts
    if num_layers % pp:
        raise ConversionError(
            f"PP={pp} does not divide num_hidden_layers={num_layers}; give the layers per "
            "stage explicitly (--target-pp-layers)"
        )
    return [num_layers // pp] * pp


def hybrid_layer_pattern(counts: Sequence[int]) -> str:
    """Megatron ``--hybrid-layer-pattern`` of parallel hybrid layers, ``|`` between stages."""
    return "|".join("P" * c for c in counts)


def pattern_layer_counts(pattern: str, pp: int) -> List[int]:
    """Layers per pipeline stage of a ``P``-only hybrid layer pattern (``|`` splits stages)."""
    main = pattern.split("/")[0]
    if set(main) - {"P", "|"}:
        raise ConversionError(
            f"hybrid_layer_pattern {pattern!r} is not a Falcon-H1 stack (only 'P' layers)"
        )
    if "/" in pattern:
        raise ConversionError("multi-token-prediction layers are not part of Falcon-H1")
    segments = main.split("|")
    if len(segments) == 1:
        return pipeline_layer_counts(len(main), pp)
    if len(segments) != pp:
        raise ConversionError(
            f"hybrid_layer_pattern has {len(segments)} pipeline segments but the checkpoint "
            f"has PP={pp} (virtual pipelines are not supported)"
        )
    return [len(s) for s in segments]


def stage_offsets(counts: Sequence[int]) -> List[int]:
    """Global index of the first layer of each pipeline stage."""
    offsets, total = [], 0
    for c in counts:
        offsets.append(total)
        total += c
    return offsets


# --------------------------------------------------------------------------------------------
# Tensor layouts
# --------------------------------------------------------------------------------------------


def _owned(t: Tensor) -> Tensor:
    """``t`` with a storage of its own (a slice would otherwise save its whole parent)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _chunk(t: Tensor, tp: int, dim: int) -> List[Tensor]:
    if t.shape[dim] % tp:
        raise ConversionError(f"dimension {dim} of shape {tuple(t.shape)} not divisible by {tp}")
    return list(torch.chunk(t, tp, dim=dim))


def split_dim(t: Tensor, tp: int, dim: int) -> List[Tensor]:
    """Split evenly along ``dim`` into ``tp`` owned tensors."""
    return [_owned(p) for p in _chunk(t, tp, dim)]


def merge_dim(shards: Sequence[Tensor], dim: int) -> Tensor:
    """Inverse of :func:`split_dim`."""
    return torch.cat(list(shards), dim=dim)


def split_segments(t: Tensor, sizes: Sequence[int], tp: int, dim: int = 0) -> List[Tensor]:
    """Split each segment of ``t`` (lengths ``sizes`` along ``dim``) ``tp`` ways; rank ``r``
    gets the concatenation of the ``r``-th piece of every segment."""
    if sum(sizes) != t.shape[dim]:
        raise ConversionError(f"segments {list(sizes)} do not cover shape {tuple(t.shape)}")
    pieces = [_chunk(seg, tp, dim) for seg in torch.split(t, list(sizes), dim=dim)]
    return [_owned(torch.cat([p[r] for p in pieces], dim=dim)) for r in range(tp)]


def merge_segments(shards: Sequence[Tensor], sizes: Sequence[int], dim: int = 0) -> Tensor:
    """Inverse of :func:`split_segments`."""
    tp = len(shards)
    local = [s // tp for s in sizes]
    per_rank = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([per_rank[r][i] for i in range(len(sizes)) for r in range(tp)], dim=dim)


def qkv_from_hf(q: Tensor, k: Tensor, v: Tensor, dims: FalconH1Dims) -> Tensor:
    """Megatron's fused QKV weight: for each query group ``[its q heads; k; v]``."""
    per_group = dims.heads // dims.kv_heads
    d, h = dims.head_dim, q.shape[1]
    q = q.reshape(dims.kv_heads, per_group * d, h)
    k = k.reshape(dims.kv_heads, d, h)
    v = v.reshape(dims.kv_heads, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def qkv_to_hf(qkv: Tensor, dims: FalconH1Dims) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`qkv_from_hf`: ``(q_proj, k_proj, v_proj)`` weights."""
    per_group = dims.heads // dims.kv_heads
    d, h = dims.head_dim, qkv.shape[1]
    grouped = qkv.reshape(dims.kv_heads, (per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (
        q.reshape(-1, h).contiguous(),
        k.reshape(-1, h).contiguous(),
        v.reshape(-1, h).contiguous(),
    )


def pad_vocab(t: Tensor, padded: int) -> Tensor:
    """Append zero rows up to ``padded`` rows (Megatron's dummy tokens)."""
    if t.shape[0] > padded:
        raise ConversionError(f"vocabulary {t.shape[0]} exceeds padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


# HF names under "model.layers.{i}." and Megatron names under "decoder.layers.{i}.".
HF_LAYER_KEYS = (
    "input_layernorm.weight",
    "pre_ff_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "feed_forward.gate_proj.weight",
    "feed_forward.up_proj.weight",
    "feed_forward.down_proj.weight",
    "mamba.in_proj.weight",
    "mamba.conv1d.weight",
    "mamba.conv1d.bias",
    "mamba.dt_bias",
    "mamba.A_log",
    "mamba.D",
    "mamba.norm.weight",
    "mamba.out_proj.weight",
)
MG_ATTN = "self_attention.attention."
MG_MAMBA = "self_attention.mamba."
MG_LAYER_KEYS = (
    "input_layernorm.weight",
    "pre_mlp_layernorm.weight",
    MG_ATTN + "linear_qkv.weight",
    MG_ATTN + "linear_proj.weight",
    MG_MAMBA + "in_proj.weight",
    MG_MAMBA + "conv1d_weight",
    MG_MAMBA + "conv1d_bias",
    MG_MAMBA + "dt_bias",
    MG_MAMBA + "A_log",
    MG_MAMBA + "D",
    MG_MAMBA + "norm.weight",
    MG_MAMBA + "out_proj.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
# Linear layers of the local spec carry an `_extra_state` entry (None) in their state dict.
MG_LAYER_EXTRA_STATES = (
    MG_ATTN + "linear_qkv._extra_state",
    MG_ATTN + "linear_proj._extra_state",
    MG_MAMBA + "in_proj._extra_state",
    MG_MAMBA + "out_proj._extra_state",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2._extra_state",
)
HF_EMBED = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.final_layernorm.weight"
HF_LM_HEAD = "lm_head.weight"
MG_EMBED = "embedding.word_embeddings.weight"
MG_FINAL_NORM = "decoder.final_norm.weight"
MG_OUTPUT = "output_layer.weight"
MG_OUTPUT_EXTRA_STATE = "output_layer._extra_state"


def hf_layer_keys(dims: FalconH1Dims) -> List[str]:
    """HF tensor names of one layer (relative to ``model.layers.{i}.``)."""
    return [k for k in HF_LAYER_KEYS if k != "mamba.norm.weight" or dims.mamba_rms_norm]


def mg_layer_keys(dims: FalconH1Dims) -> List[str]:
    """Megatron tensor names of one layer (relative to ``decoder.layers.{i}.``)."""
    return [k for k in MG_LAYER_KEYS if k != MG_MAMBA + "norm.weight" or dims.mamba_rms_norm]


def hf_shapes(dims: FalconH1Dims) -> Dict[str, Tuple[int, ...]]:
    """Expected shape of every HF tensor of the model."""
    d, h = dims, dims.hidden
    layer = {
        "input_layernorm.weight": (h,),
        "pre_ff_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (d.heads * d.head_dim, h),
        "self_attn.k_proj.weight": (d.kv_heads * d.head_dim, h),
        "self_attn.v_proj.weight": (d.kv_heads * d.head_dim, h),
        "self_attn.o_proj.weight": (h, d.heads * d.head_dim),
        "feed_forward.gate_proj.weight": (d.ffn, h),
        "feed_forward.up_proj.weight": (d.ffn, h),
        "feed_forward.down_proj.weight": (h, d.ffn),
        "mamba.in_proj.weight": (sum(d.in_proj_sizes()), h),
        "mamba.conv1d.weight": (sum(d.conv_sizes()), 1, d.conv_kernel),
        "mamba.conv1d.bias": (sum(d.conv_sizes()),),
        "mamba.dt_bias": (d.mamba_heads,),
        "mamba.A_log": (d.mamba_heads,),
        "mamba.D": (d.mamba_heads,),
        "mamba.norm.weight": (d.d_ssm,),
        "mamba.out_proj.weight": (h, d.d_ssm),
    }
    out = {HF_EMBED: (d.vocab, h), HF_FINAL_NORM: (h,), HF_LM_HEAD: (d.vocab, h)}
    for i in range(d.num_layers):
        for key in hf_layer_keys(d):
            out[f"model.layers.{i}.{key}"] = layer[key]
    return out


def hf_layer_to_megatron(
    layer: Mapping[str, Tensor], dims: FalconH1Dims, tp: int
) -> List[Dict[str, Tensor]]:
    """One HF layer (names relative to ``model.layers.{i}.``) -> per-TP-rank Megatron tensors
    (names relative to ``decoder.layers.{i}.``)."""
    out: List[Dict[str, Tensor]] = [{} for _ in range(tp)]

    def put(name: str, shards: Sequence[Tensor]) -> None:
        for r in range(tp):
            out[r][name] = shards[r]

    def replicated(t: Tensor) -> List[Tensor]:
        t = _owned(t)
        return [t] * tp

    put("input_layernorm.weight", replicated(layer["input_layernorm.weight"]))
    put("pre_mlp_layernorm.weight", replicated(layer["pre_ff_layernorm.weight"]))
    qkv = qkv_from_hf(
        layer["self_attn.q_proj.weight"],
        layer["self_attn.k_proj.weight"],
        layer["self_attn.v_proj.weight"],
        dims,
    )
    put(MG_ATTN + "linear_qkv.weight", split_dim(qkv, tp, 0))
    put(MG_ATTN + "linear_proj.weight", split_dim(layer["self_attn.o_proj.weight"], tp, 1))
    put(
        MG_MAMBA + "in_proj.weight",
        split_segments(layer["mamba.in_proj.weight"], dims.in_proj_sizes(), tp),
    )
    put(
        MG_MAMBA + "conv1d_weight",
        split_segments(layer["mamba.conv1d.weight"], dims.conv_sizes(), tp),
    )
    put(MG_MAMBA + "conv1d_bias", split_segments(layer["mamba.conv1d.bias"], dims.conv_sizes(), tp))
    for name in ("dt_bias", "A_log", "D"):
        put(MG_MAMBA + name, split_dim(layer["mamba." + name], tp, 0))
    if dims.mamba_rms_norm:
        put(MG_MAMBA + "norm.weight", split_dim(layer["mamba.norm.weight"], tp, 0))
    put(MG_MAMBA + "out_proj.weight", split_dim(layer["mamba.out_proj.weight"], tp, 1))
    fc1 = torch.cat(
        [layer["feed_forward.gate_proj.weight"], layer["feed_forward.up_proj.weight"]], dim=0
    )
    put("mlp.linear_fc1.weight", split_segments(fc1, [dims.ffn, dims.ffn], tp))
    put("mlp.linear_fc2.weight", split_dim(layer["feed_forward.down_proj.weight"], tp, 1))
    return out


def megatron_layer_to_hf(shards: Sequence[Mapping[str, Tensor]], dims: FalconH1Dims) -> dict:
    """Inverse of :func:`hf_layer_to_megatron`: per-TP-rank Megatron tensors of one layer ->
    HF tensors (names relative to ``model.layers.{i}.``)."""

    def cat(name: str, dim: int) -> Tensor:
        return merge_dim([s[name] for s in shards], dim)

    def first(name: str) -> Tensor:
        return shards[0][name]

    out: Dict[str, Tensor] = {}
    out["input_layernorm.weight"] = first("input_layernorm.weight")
    out["pre_ff_layernorm.weight"] = first("pre_mlp_layernorm.weight")
    q, k, v = qkv_to_hf(cat(MG_ATTN + "linear_qkv.weight", 0), dims)
    out["self_attn.q_proj.weight"] = q
    out["self_attn.k_proj.weight"] = k
    out["self_attn.v_proj.weight"] = v
    out["self_attn.o_proj.weight"] = cat(MG_ATTN + "linear_proj.weight", 1)
    fc1 = merge_segments([s["mlp.linear_fc1.weight"] for s in shards], [dims.ffn, dims.ffn])
    out["feed_forward.gate_proj.weight"] = fc1[: dims.ffn].contiguous()
    out["feed_forward.up_proj.weight"] = fc1[dims.ffn :].contiguous()
    out["feed_forward.down_proj.weight"] = cat("mlp.linear_fc2.weight", 1)
    out["mamba.in_proj.weight"] = merge_segments(
        [s[MG_MAMBA + "in_proj.weight"] for s in shards], dims.in_proj_sizes()
    )
    out["mamba.conv1d.weight"] = merge_segments(
        [s[MG_MAMBA + "conv1d_weight"] for s in shards], dims.conv_sizes()
    )
    out["mamba.conv1d.bias"] = merge_segments(
        [s[MG_MAMBA + "conv1d_bias"] for s in shards], dims.conv_sizes()
    )
    for name in ("dt_bias", "A_log", "D"):
        out["mamba." + name] = cat(MG_MAMBA + name, 0)
    if dims.mamba_rms_norm:
        out["mamba.norm.weight"] = cat(MG_MAMBA + "norm.weight", 0)
    out["mamba.out_proj.weight"] = cat(MG_MAMBA + "out_proj.weight", 1)
    return out


def check_replicas_equal(shards: Sequence[Mapping[str, Tensor]], names: Iterable[str]) -> None:
    """Replicated tensors (norms) must be identical on every TP rank."""
    for name in names:
        ref = shards[0][name]
        for r, s in enumerate(shards[1:], start=1):
            if not torch.equal(ref, s[name]):
                raise ConversionError(f"{name} differs between TP rank 0 and TP rank {r}")


def hf_vocab_to_megatron(t: Tensor, padded: int, tp: int) -> List[Tensor]:
    """Embedding or output-layer weight -> per-TP-rank shards of the padded vocabulary."""
    return split_dim(pad_vocab(t, padded), tp, 0)


def megatron_vocab_to_hf(shards: Sequence[Tensor], vocab: int) -> Tensor:
    """Inverse of :func:`hf_vocab_to_megatron` (drops the padding rows)."""
    full = merge_dim(shards, 0)
    if full.shape[0] < vocab:
        raise ConversionError(f"checkpoint vocabulary {full.shape[0]} < HF vocab_size {vocab}")
    return full[:vocab].contiguous()


# --------------------------------------------------------------------------------------------
# Megatron torch_dist (global tensors) layout
# --------------------------------------------------------------------------------------------


def torch_dist_layer_keys(dims: FalconH1Dims, i: int) -> Dict[str, Tuple[int, ...]]:
    """Global tensors of layer ``i`` in a Megatron ``torch_dist`` checkpoint, with shapes."""
    p = f"decoder.layers.{i}."
    d, h = dims, dims.hidden
    qkv_rows = (d.heads + 2 * d.kv_heads) * d.head_dim
    out = {
        p + "input_layernorm.weight": (h,),
        p + "pre_mlp_layernorm.weight": (h,),
        p + MG_ATTN + "linear_qkv.weight": (qkv_rows, h),
        p + MG_ATTN + "linear_proj.weight": (h, d.heads * d.head_dim),
        p + MG_MAMBA + "dt_bias": (d.mamba_heads,),
        p + MG_MAMBA + "A_log": (d.mamba_heads,),
        p + MG_MAMBA + "D": (d.mamba_heads,),
        p + MG_MAMBA + "out_proj.weight": (h, d.d_ssm),
        p + "mlp.linear_fc1.weight": (2 * d.ffn, h),
        p + "mlp.linear_fc2.weight": (h, d.ffn),
    }
    for part, rows in zip(("z", "x", "B", "C", "dt"), d.in_proj_sizes()):
        out[p + MG_MAMBA + f"in_proj.weight.{part}"] = (rows, h)
    for part, rows in zip(("x", "B", "C"), d.conv_sizes()):
        out[p + MG_MAMBA + f"conv1d.weight.{part}"] = (rows, 1, d.conv_kernel)
        out[p + MG_MAMBA + f"conv1d.bias.{part}"] = (rows,)
    if d.mamba_rms_norm:
        out[p + MG_MAMBA + "norm.weight"] = (d.d_ssm,)
    return out


def torch_dist_keys(dims: FalconH1Dims, padded_vocab: int) -> Dict[str, Tuple[int, ...]]:
    """Every global model tensor of a Falcon-H1 ``torch_dist`` checkpoint, with shapes."""
    out = {MG_EMBED: (padded_vocab, dims.hidden)}
    for i in range(dims.num_layers):
        out.update(torch_dist_layer_keys(dims, i))
    out[MG_FINAL_NORM] = (dims.hidden,)
    out[MG_OUTPUT] = (padded_vocab, dims.hidden)
    return out


def torch_dist_layer_to_hf(tensors: Mapping[str, Tensor], dims: FalconH1Dims, i: int) -> dict:
    """Global ``torch_dist`` tensors of layer ``i`` -> HF tensors (relative names)."""
    p = f"decoder.layers.{i}."
    m = p + MG_MAMBA
    layer = {
        "input_layernorm.weight": tensors[p + "input_layernorm.weight"],
        "pre_mlp_layernorm.weight": tensors[p + "pre_mlp_layernorm.weight"],
        MG_ATTN + "linear_qkv.weight": tensors[p + MG_ATTN + "linear_qkv.weight"],
        MG_ATTN + "linear_proj.weight": tensors[p + MG_ATTN + "linear_proj.weight"],
        MG_MAMBA
        + "in_proj.weight": torch.cat(
            [tensors[m + f"in_proj.weight.{c}"] for c in ("z", "x", "B", "C", "dt")]
        ),
        MG_MAMBA
        + "conv1d_weight": torch.cat([tensors[m + f"conv1d.weight.{c}"] for c in ("x", "B", "C")]),
        MG_MAMBA
        + "conv1d_bias": torch.cat([tensors[m + f"conv1d.bias.{c}"] for c in ("x", "B", "C")]),
        MG_MAMBA + "out_proj.weight": tensors[m + "out_proj.weight"],
        "mlp.linear_fc1.weight": tensors[p + "mlp.linear_fc1.weight"],
        "mlp.linear_fc2.weight": tensors[p + "mlp.linear_fc2.weight"],
    }
    for name in ("dt_bias", "A_log", "D") + (("norm.weight",) if dims.mamba_rms_norm else ()):
        layer[MG_MAMBA + name] = tensors[m + name]
    return megatron_layer_to_hf([layer], dims)


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


def _arg(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def settings_from_megatron_args(args, vocab: Optional[int] = None) -> Tuple[HFSettings, List[int]]:
    """HF settings of the Falcon-H1 model that Megatron ``args`` describe, and the layers of
    each pipeline stage. ``vocab`` (the unpadded vocabulary) defaults to the recorded HF
    config's, then ``args.vocab_size``.

    Raises :class:`ConversionError` when the args describe something else than a Falcon-H1
    stack of parallel hybrid layers.
    """
    problems = []

    def expect(name, wanted, default=None):
        value = getattr(args, name, default)
        if value != wanted:
            problems.append(f"{name}={value!r} (Falcon-H1 needs {wanted!r})")

    expect("swiglu", True)
    expect("normalization", "RMSNorm")
    expect("add_bias_linear", False)
    expect("add_qkv_bias", False, False)
    expect("untie_embeddings_and_output_weights", True)
    expect("position_embedding_type", "rope")
    expect("rotary_percent", 1.0, 1.0)
    expect("rotary_interleaved", False, False)
    expect("qk_layernorm", False, False)
    expect("attention_output_gate", False, False)
    expect("apply_layernorm_1p", False, False)
    expect("num_experts", None)
    expect("use_rope_scaling", False, False)
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
    pp = int(_arg(args, "pipeline_model_parallel_size", 1))
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
    head_dim = int(_arg(args, "kv_channels", hidden // heads))
    mamba_head_dim = int(args.mamba_head_dim)
    mamba_heads = getattr(args, "mamba_num_heads", None)
    if mamba_heads is None:
        mamba_heads = 2 * hidden // mamba_head_dim  # MambaMixer's default expand=2
    multipliers: Dict[str, object] = {}
    for name in SCALAR_MULTIPLIERS:
        multipliers[name] = float(_arg(args, name, 1.0))
    for name, count in LIST_MULTIPLIERS.items():
        multipliers[name] = [float(v) for v in _arg(args, name, [1.0] * count)]
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
        conv_kernel=int(_arg(args, "mamba_conv_kernel", 4)),
        mamba_rms_norm=bool(_arg(args, "mamba_rms_norm", True)),
    )
    settings = HFSettings(
        dims=dims,
        rms_norm_eps=float(_arg(args, "layernorm_epsilon", 1e-5)),
        rope_theta=float(_arg(args, "rotary_base", 10000)),
        max_position_embeddings=int(args.max_position_embeddings),
        mamba_chunk_size=int(_arg(args, "mamba_chunk_size", 128)),
        attention_dropout=float(_arg(args, "attention_dropout", 0.0)),
        multipliers=multipliers,
    )
    return settings, counts
