#!/usr/bin/env python3
# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Export a Megatron BitNet b1.58 checkpoint (``--use-bitnet``) to HF transformers.

::

    python tools/checkpoint/bitnet_hf_export.py --load-dir CKPT --save-dir OUT \\
        [--model auto|gpt|falcon-h1] [--format bitnet|dense] [--dtype auto|bf16|fp32] \\
        [--linear-class bitlinear|autobitlinear] [--vocab-size N] [--force]

Models:

* ``gpt``: a GPT built with ``--swiglu --normalization RMSNorm --disable-bias-linear
  --position-embedding-type rope --untie-embeddings-and-output-weights`` (GQA optional) becomes
  ``LlamaForCausalLM`` (rotate-half RoPE, ``rope_theta = --rotary-base``, ``rms_norm_eps =
  --norm-epsilon``, ``head_dim = kv_channels``). Anything Llama cannot express (biases, QK
  norm, interleaved or scaled RoPE, MoE, MTP, muP / Falcon multipliers, tied embeddings, ...) is
  refused.
* ``falcon-h1``: a Falcon-H1 stack of parallel hybrid ``P`` layers becomes
  ``FalconH1ForCausalLM``, read by the dense converter's reader (``falcon_h1_checkpoint``).

Formats:

* ``bitnet`` (default): transformers' ``bitnet`` quantization. Every BitNet projection
  (q, k, v, o, gate, up, down; Falcon-H1 also Mamba in_proj / out_proj) is written as its
  ternary matrix ``T`` packed 2 bits per value along dim 0 into uint8 ``[out/4, in]`` (value
  ``t + 1`` of row ``i*out/4 + r`` in bits ``2i, 2i+1`` of packed row ``r``), plus
  ``weight_scale`` of shape ``[1]``: ``1/beta`` for ``BitLinear`` (it divides), ``beta`` for
  ``AutoBitLinear`` in offline mode (it multiplies). Embeddings, norms and ``lm_head`` stay full
  precision (``modules_to_not_convert = ["lm_head"]``). With ``--bitnet-rms-norm`` the
  per-linear input norms are exported as ``<linear>.rms_norm.weight`` (``use_rms_norm`` and
  ``rms_norm_eps`` in the quantization config); Megatron's one norm in front of a fused
  linear_qkv / linear_fc1 is copied to each of q, k, v / gate, up.
* ``dense``: the plain (unquantised) HF model with the dequantised weights ``beta * T``. It
  does *not* quantise activations, so it is not the BitNet model's forward pass; use it to
  inspect the ternary weights with ordinary tools or to fine-tune from them. Refused with
  ``--bitnet-rms-norm`` (a plain model has nowhere to put the per-linear norms).

Exactness: ``beta`` and ``T`` are computed with Megatron's own reference functions
(``megatron.core.bitnet.quant``: ``beta = max(mean|W|, 1e-5)`` with an fp64 sum, ``T =
clamp(round_half_even(W / beta), -1, 1)``) on each *logical* matrix after merging the TP shards
(q, k, v separately from linear_qkv, gate and up separately from linear_fc1, every other
projection whole, including Mamba's in_proj), which is what Megatron's BitNet layers compute
across TP ranks. The weights quantised are the model weights the checkpoint holds (the bf16
copy of a bf16 run, like Megatron's forward), not the optimizer's fp32 master copy.

Inputs: legacy ``torch`` checkpoints at any TP (GPT: any PP, the stage of each layer is read
from the files; Falcon-H1: any PP), ``torch_dist`` checkpoints (global tensors; any TP / PP).
The step is the one ``latest_checkpointed_iteration.txt`` names (or pass an ``iter_*``
directory). Output is written to a temporary directory next to ``--save-dir`` and renamed into
place; an existing non-empty ``--save-dir`` is only replaced with ``--force``.

Memory: legacy files are memory-mapped and converted layer by layer; a GPT ``torch_dist``
checkpoint stores all layers of one kind of weight as one stacked tensor, so its model weights
are read whole.

Numerics of the HF model (fp32): transformers' BitLinear quantises activations as
``round(x * (127 / absmax))`` where Megatron computes ``round(x * 127 / absmax)``; the two
differ by one fp32 rounding, so an activation within that distance of a half can round to the
neighbouring integer (about 1 in 10^6 elements of Gaussian data). Logits therefore match
Megatron's to fp32 round-off (tests/bitnet_export measures < 5e-7 of the largest logit on tiny
models), not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent  # the Megatron tree
for _p in (str(_HERE), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import falcon_h1_config as cfg  # noqa: E402
import falcon_h1_layouts as layouts  # noqa: E402
from conversion_io import (  # noqa: E402
    ConversionError,
    LegacyReader,
    Progress,
    SafetensorsWriter,
    TorchDistReader,
    arg_mismatches,
    arg_value,
    atomic_output_dir,
    check_tensors,
    gib,
    logger,
    merge_replicated,
    open_megatron_checkpoint,
    run_tool,
)
from falcon_h1_checkpoint import FalconH1Checkpoint  # noqa: E402

Tensor = torch.Tensor

#: Ternary values per packed uint8 (2 bits each), along dim 0.
VALUES_PER_BYTE = 4
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: HF modules that stay full precision.
MODULES_TO_NOT_CONVERT = ["lm_head"]


_log = logger("bitnet-hf-export")


def _quant():
    """Megatron's BitNet reference functions (imported lazily: importing Megatron is slow)."""
    from megatron.core.bitnet import quant

    return quant


# --------------------------------------------------------------------------------------------
# Ternary packing (transformers' bitnet layout)
# --------------------------------------------------------------------------------------------


def pack_ternary(t: Tensor) -> Tensor:
    """Pack ternary ``t`` ``[N, ...]`` (values in {-1, 0, 1}) into uint8 ``[N/4, ...]``.

    Row ``i * N/4 + r`` of ``t`` goes, as ``t + 1`` in {0, 1, 2}, into bits ``2i, 2i+1`` of
    packed row ``r``.
    """
    rows = t.shape[0]
    if rows % VALUES_PER_BYTE:
        raise ConversionError(
            f"cannot pack a ternary matrix of {rows} rows: transformers' BitLinear needs the "
            f"output size to be a multiple of {VALUES_PER_BYTE}"
        )
    if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
        raise ConversionError("pack_ternary: values outside {-1, 0, 1}")
    u = (t.to(torch.int16) + 1).to(torch.uint8)
    u = u.reshape(VALUES_PER_BYTE, rows // VALUES_PER_BYTE, *t.shape[1:])
    packed = torch.zeros_like(u[0])
    for i in range(VALUES_PER_BYTE):
        packed |= u[i] << (2 * i)
    return packed


def unpack_ternary(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_ternary`: int8 ``[4 * R, ...]`` in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise ConversionError(f"packed ternary weights must be uint8, got {packed.dtype}")
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(VALUES_PER_BYTE)]
    return torch.cat(parts, dim=0)


def ternarize(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``(T, beta)`` of one logical matrix with Megatron's reference quantiser.

    ``beta`` is a 0-dim fp32 tensor, ``T`` int8 with ``weight``'s shape.
    """
    quant = _quant()
    beta = quant.weight_scale(weight)
    t, beta = quant.quantize_weight(weight, beta)
    return t, beta


def bitlinear_tensors(
    t: Tensor, beta: Tensor, linear_class: str, dtype: torch.dtype
) -> Dict[str, Tensor]:
    """``{"weight": packed, "weight_scale": [1]}`` for one transformers BitNet linear."""
    if linear_class == "bitlinear":
        # BitLinear divides its output by weight_scale: store 1/beta (an IEEE fp32 quotient).
        scale = torch.ones((), dtype=torch.float32) / beta.to(torch.float32)
    elif linear_class == "autobitlinear":
        scale = beta.to(torch.float32)  # AutoBitLinear (offline) multiplies by it
    else:
        raise ConversionError(f"unknown linear class {linear_class!r}")
    return {"weight": pack_ternary(t), "weight_scale": scale.reshape(1).to(dtype)}


# --------------------------------------------------------------------------------------------
# Checkpoint access
# --------------------------------------------------------------------------------------------


#: BitNet input-norm weights (``--bitnet-rms-norm``) per Megatron linear: column-parallel ones
#: are replicated over TP, row-parallel ones are split like the input features (dim 0).
def _rms_key(linear: str) -> str:
    return f"{linear}.rms_norm.weight"


# --------------------------------------------------------------------------------------------
# GPT -> Llama
# --------------------------------------------------------------------------------------------

# Megatron names (relative to decoder.layers.{i}.) of the GPT local spec. The norms have a
# second name: the one the layer's sharded state dict (torch_dist) maps them to.
GPT_QKV = "self_attention.linear_qkv"
GPT_PROJ = "self_attention.linear_proj"
GPT_FC1 = "mlp.linear_fc1"
GPT_FC2 = "mlp.linear_fc2"
GPT_LINEARS = (GPT_QKV, GPT_PROJ, GPT_FC1, GPT_FC2)
GPT_COLUMN_PARALLEL = (GPT_QKV, GPT_FC1)
GPT_NORMS = {
    "input_layernorm.weight": ("input_layernorm.weight", GPT_QKV + ".layer_norm_weight"),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", GPT_FC1 + ".layer_norm_weight"),
}
GPT_EMBED = "embedding.word_embeddings.weight"
GPT_FINAL_NORM = ("decoder.final_layernorm.weight", "decoder.final_norm.weight")
GPT_OUTPUT = "output_layer.weight"
#: HF linears (relative to model.layers.{i}.) made from each Megatron linear.
GPT_HF_LINEARS = {
    GPT_QKV: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    GPT_PROJ: ("self_attn.o_proj",),
    GPT_FC1: ("mlp.gate_proj", "mlp.up_proj"),
    GPT_FC2: ("mlp.down_proj",),
}
FALCON_HF_LINEARS = {
    layouts.MG_ATTN + "linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    layouts.MG_ATTN + "linear_proj": ("self_attn.o_proj",),
    layouts.MG_MAMBA + "in_proj": ("mamba.in_proj",),
    layouts.MG_MAMBA + "out_proj": ("mamba.out_proj",),
    "mlp.linear_fc1": ("feed_forward.gate_proj", "feed_forward.up_proj"),
    "mlp.linear_fc2": ("feed_forward.down_proj",),
}
FALCON_COLUMN_PARALLEL = (
    layouts.MG_ATTN + "linear_qkv",
    layouts.MG_MAMBA + "in_proj",
    "mlp.linear_fc1",
)


# Megatron arguments of a GPT that Llama represents: (name, value[, default when absent]).
_LLAMA_ARGS = (
    ("swiglu", True),
    ("normalization", "RMSNorm"),
    ("add_bias_linear", False),
    ("add_qkv_bias", False, False),
    ("position_embedding_type", "rope"),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_interleaved", False, False),
    ("use_rope_scaling", False, False),
    ("rotary_seq_len_interpolation_factor", None),
    ("rope_type", None),
    ("no_rope_freq", None),
    ("untie_embeddings_and_output_weights", True),
    ("qk_layernorm", False, False),
    ("qk_l2_norm", False, False),
    ("apply_layernorm_1p", False, False),
    ("layernorm_zero_centered_gamma", False, False),
    ("apply_residual_connection_post_layernorm", False, False),
    ("attention_output_gate", False, False),
    ("softmax_type", "vanilla", "vanilla"),
    ("glu_linear_offset", 0.0, 0.0),
    ("activation_func_clamp_value", None),
    ("window_size", None),
    ("num_experts", None),
    ("mtp_num_layers", None),
    ("multi_latent_attention", False, False),
    ("experimental_attention_variant", None),
    ("heterogeneous_layers_config_path", None),
    ("spec", None),
    ("yaml_cfg", None),
    ("hybrid_layer_pattern", None),
    ("use_mup", False, False),
    ("virtual_pipeline_model_parallel_size", None),
)


def check_gpt_args(args) -> SimpleNamespace:
    """Shapes of the Llama model the GPT ``args`` describe; ConversionError for anything a
    ``LlamaForCausalLM`` cannot express."""
    problems = arg_mismatches(args, _LLAMA_ARGS, "needs")
    for name in cfg.SCALAR_MULTIPLIERS:
        if float(arg_value(args, name, 1.0)) != 1.0:
            problems.append(f"{name}={getattr(args, name)!r} (Llama has no multipliers)")
    for name in cfg.LIST_MULTIPLIERS:
        value = getattr(args, name, None)
        if value is not None and any(float(v) != 1.0 for v in value):
            problems.append(f"{name}={value!r} (Llama has no multipliers)")
    if problems:
        raise ConversionError(
            "the checkpoint's GPT is not a model LlamaForCausalLM can represent: "
            + "; ".join(problems)
        )
    hidden = int(args.hidden_size)
    heads = int(args.num_attention_heads)
    kv_heads = (
        int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    )
    if heads % kv_heads:
        raise ConversionError(f"num_attention_heads {heads} not divisible by groups {kv_heads}")
    return SimpleNamespace(
        num_layers=int(args.num_layers),
        hidden=hidden,
        ffn=int(args.ffn_hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=int(arg_value(args, "kv_channels", hidden // heads)),
        rms_norm_eps=float(arg_value(args, "layernorm_epsilon", 1e-5)),
        rope_theta=float(arg_value(args, "rotary_base", 10000)),
        max_position_embeddings=int(args.max_position_embeddings),
        init_std=float(arg_value(args, "init_method_std", 0.02)),
    )


def llama_config(dims: SimpleNamespace, vocab: int) -> dict:
    """HF ``config.json`` content of the Llama model (without quantization / dtype keys)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.ffn,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": dims.max_position_embeddings,
        "rms_norm_eps": dims.rms_norm_eps,
        # transformers >= 5 reads rope_parameters, 4.x rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": dims.rope_theta},
        "rope_theta": dims.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "pretraining_tp": 1,
        "initializer_range": dims.init_std,
        "use_cache": True,
    }


class _GptLegacy:
    """Per-layer Megatron tensors of a legacy GPT checkpoint, TP shards merged to TP=1 layout."""

    def __init__(self, reader: LegacyReader, dims: SimpleNamespace, rms: bool):
        self.reader, self.dims, self.rms = reader, dims, rms
        # Layers of each pipeline stage, from the files (handles uneven splits).
        self.stage_of: List[Tuple[int, int]] = []
        pattern = re.compile(r"decoder\.layers\.(\d+)\.")
        for s in range(reader.pp):
            local = {
                int(m.group(1)) for k in reader.models[(0, s)] for m in [pattern.match(k)] if m
            }
            if local != set(range(len(local))):
                raise ConversionError(f"pipeline stage {s}: non-contiguous layers {sorted(local)}")
            self.stage_of += [(s, i) for i in range(len(local))]
        if len(self.stage_of) != dims.num_layers:
            raise ConversionError(
                f"the checkpoint holds {len(self.stage_of)} layers, its args say {dims.num_layers}"
            )
        self._check()

    def _norm_name(self, model: dict, prefix: str, names: Sequence[str]) -> str:
        for n in names:
            if prefix + n in model:
                return n
        raise ConversionError(f"no {' / '.join(prefix + n for n in names)} in the checkpoint")

    def _check(self) -> None:
        r = self.reader
        for (tp_rank, s), model in r.models.items():
            expected = []
            if s == 0:
                expected.append(GPT_EMBED)
            if s == r.pp - 1:
                expected += [self._norm_name(model, "", GPT_FINAL_NORM), GPT_OUTPUT]
            for stage, local in self.stage_of:
                if stage != s:
                    continue
                p = f"decoder.layers.{local}."
                expected += [p + self._norm_name(model, p, names) for names in GPT_NORMS.values()]
                expected += [p + lin + ".weight" for lin in GPT_LINEARS]
                if self.rms:
                    expected += [p + _rms_key(lin) for lin in GPT_LINEARS]
            check_tensors(f"rank TP={tp_rank} PP={s}", list(model), expected)

    def embedding(self) -> Tensor:
        return torch.cat(self.reader.shards(GPT_EMBED, 0), dim=0)

    def final_norm(self) -> Tensor:
        last = self.reader.pp - 1
        name = self._norm_name(self.reader.models[(0, last)], "", GPT_FINAL_NORM)
        return merge_replicated(name, self.reader.shards(name, last))

    def output(self) -> Tensor:
        return torch.cat(self.reader.shards(GPT_OUTPUT, self.reader.pp - 1), dim=0)

    def layer(self, i: int) -> Dict[str, Tensor]:
        """Megatron names (TP=1 layout) -> tensors of global layer ``i``."""
        stage, local = self.stage_of[i]
        p = f"decoder.layers.{local}."
        model0 = self.reader.models[(0, stage)]
        out: Dict[str, Tensor] = {}
        for hf_name, names in GPT_NORMS.items():
            n = self._norm_name(model0, p, names)
            out[hf_name] = merge_replicated(p + n, self.reader.shards(p + n, stage))
        # Each rank holds whole query groups [q heads; k; v] -> concatenating keeps the layout.
        out[GPT_QKV] = torch.cat(self.reader.shards(p + GPT_QKV + ".weight", stage), dim=0)
        out[GPT_PROJ] = torch.cat(self.reader.shards(p + GPT_PROJ + ".weight", stage), dim=1)
        ffn = self.dims.ffn
        out[GPT_FC1] = layouts.merge_segments(
            self.reader.shards(p + GPT_FC1 + ".weight", stage), [ffn, ffn]
        )
        out[GPT_FC2] = torch.cat(self.reader.shards(p + GPT_FC2 + ".weight", stage), dim=1)
        if self.rms:
            for lin in GPT_LINEARS:
                shards = self.reader.shards(p + _rms_key(lin), stage)
                out[_rms_key(lin)] = (
                    merge_replicated(p + _rms_key(lin), shards)
                    if lin in GPT_COLUMN_PARALLEL
                    else torch.cat(shards, dim=0)
                )
        return out


class _GptTorchDist:
    """Per-layer tensors of a GPT ``torch_dist`` checkpoint (global tensors; homogeneous layers
    are stored stacked, ``decoder.layers.<name>`` with a leading layer dimension)."""

    def __init__(self, reader: TorchDistReader, dims: SimpleNamespace, rms: bool):
        self.dims, self.rms = dims, rms
        names = set(reader.tensors)
        L = dims.num_layers
        per_index = re.compile(r"decoder\.layers\.\d+\.")
        self.stacked = any(
            k.startswith("decoder.layers.") and not per_index.match(k) for k in names
        )
        per_layer = [GPT_QKV + ".weight", GPT_PROJ + ".weight", GPT_FC1 + ".weight"]
        per_layer += [GPT_FC2 + ".weight"]
        if rms:
            per_layer += [_rms_key(lin) for lin in GPT_LINEARS]
        self.norm_names = {}
        for hf_name, cands in GPT_NORMS.items():
            probe = "decoder.layers." + ("" if self.stacked else "0.")
            found = [c for c in cands if probe + c in names]
            if not found:
                raise ConversionError(f"torch_dist checkpoint: no {' / '.join(cands)} tensors")
            self.norm_names[hf_name] = found[0]
        per_layer += list(self.norm_names.values())
        final = [n for n in GPT_FINAL_NORM if n in names]
        if not final:
            raise ConversionError(f"torch_dist checkpoint: no {' / '.join(GPT_FINAL_NORM)}")
        self.final_name = final[0]
        expected = [GPT_EMBED, self.final_name, GPT_OUTPUT]
        if self.stacked:
            expected += ["decoder.layers." + n for n in per_layer]
        else:
            expected += [f"decoder.layers.{i}.{n}" for i in range(L) for n in per_layer]
        reader.check(dict.fromkeys(expected))
        if self.stacked:
            for n in per_layer:
                size = tuple(reader.tensors["decoder.layers." + n].size)
                if size[0] != L:
                    raise ConversionError(f"decoder.layers.{n} stacks {size[0]} layers, not {L}")
        self.tensors = reader.read(expected)

    def embedding(self) -> Tensor:
        return self.tensors[GPT_EMBED]

    def final_norm(self) -> Tensor:
        return self.tensors[self.final_name]

    def output(self) -> Tensor:
        return self.tensors[GPT_OUTPUT]

    def _get(self, i: int, name: str) -> Tensor:
        if self.stacked:
            return self.tensors["decoder.layers." + name][i]
        return self.tensors[f"decoder.layers.{i}.{name}"]

    def layer(self, i: int) -> Dict[str, Tensor]:
        out = {hf: self._get(i, n) for hf, n in self.norm_names.items()}
        for lin in GPT_LINEARS:
            out[lin] = self._get(i, lin + ".weight")
            if self.rms:
                out[_rms_key(lin)] = self._get(i, _rms_key(lin))
        return out


def gpt_layer_to_hf(mg: Dict[str, Tensor], dims: SimpleNamespace, rms: bool) -> Dict[str, Tensor]:
    """Megatron GPT layer (TP=1 layout) -> Llama tensors (relative to model.layers.{i}.).

    Linears are full-precision matrices here (``<module>.weight``); :func:`_write_layer`
    quantises them.
    """
    out = {k: mg[k] for k in GPT_NORMS}
    q, k, v = layouts.qkv_to_hf(mg[GPT_QKV], dims)
    out["self_attn.q_proj.weight"] = q
    out["self_attn.k_proj.weight"] = k
    out["self_attn.v_proj.weight"] = v
    out["self_attn.o_proj.weight"] = mg[GPT_PROJ]
    fc1 = mg[GPT_FC1]
    if fc1.shape[0] != 2 * dims.ffn:
        raise ConversionError(f"linear_fc1 has {fc1.shape[0]} rows, expected 2 x {dims.ffn}")
    out["mlp.gate_proj.weight"] = fc1[: dims.ffn].contiguous()
    out["mlp.up_proj.weight"] = fc1[dims.ffn :].contiguous()
    out["mlp.down_proj.weight"] = mg[GPT_FC2]
    if rms:
        for lin, hf_mods in GPT_HF_LINEARS.items():
            for mod in hf_mods:
                out[mod + ".rms_norm.weight"] = mg[_rms_key(lin)]
    return out


# --------------------------------------------------------------------------------------------
# Falcon-H1
# --------------------------------------------------------------------------------------------


def _falcon_rms_to_hf(mg: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for lin, hf_mods in FALCON_HF_LINEARS.items():
        for mod in hf_mods:
            out[mod + ".rms_norm.weight"] = mg[_rms_key(lin)]
    return out


def _falcon_layer(ckpt: FalconH1Checkpoint, i: int, rms: bool) -> Dict[str, Tensor]:
    """HF tensors of layer ``i``, with the per-linear input norms of ``--bitnet-rms-norm``."""
    out, norms = ckpt.layer(i)
    if rms:
        out.update(_falcon_rms_to_hf(norms))
    return out


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def detect_model(args) -> str:
    """``falcon-h1`` for a hybrid layer pattern (of ``P`` layers), else ``gpt``."""
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if pattern:
        return "falcon-h1"
    return "gpt"


def quantization_config(opts, args) -> dict:
    """transformers' ``BitNetQuantConfig`` as a dict."""
    return {
        "quant_method": "bitnet",
        "linear_class": opts.linear_class,
        "quantization_mode": "offline",
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT),
        "use_rms_norm": bool(getattr(args, "bitnet_rms_norm", False)),
        "rms_norm_eps": float(arg_value(args, "bitnet_rms_norm_eps", 1e-6)),
    }


class _Stats:
    def __init__(self):
        self.linears = 0
        self.betas: List[float] = []


def _write_layer(
    writer: SafetensorsWriter,
    prefix: str,
    layer: Dict[str, Tensor],
    linears: Sequence[str],
    opts,
    conv: Callable[[Tensor], Tensor],
    out_dtype: torch.dtype,
    stats: _Stats,
) -> None:
    """Write one HF layer; ``linears`` (module names) are quantised."""
    quant = _quant()
    for name, tensor in layer.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in linears:
            # An owned copy: norms shared by several HF modules, slices of stacked tensors.
            writer.add(prefix + name, conv(tensor).clone())
            continue
        t, beta = ternarize(tensor)
        stats.linears += 1
        stats.betas.append(float(beta))
        if opts.format == "dense":
            writer.add(prefix + name, quant.dequantize_weight(t, beta, out_dtype))
        else:
            for suffix, value in bitlinear_tensors(t, beta, opts.linear_class, out_dtype).items():
                writer.add(f"{prefix}{module}.{suffix}", value)


def export(opts: argparse.Namespace) -> None:
    """Run the export described by parsed command-line ``opts``."""
    load_dir = Path(opts.load_dir)
    if not load_dir.exists():
        raise ConversionError(f"--load-dir {load_dir} does not exist")
    reader = open_megatron_checkpoint(load_dir)
    ckpt_dir, is_dist, args = reader.ckpt_dir, reader.is_dist, reader.args
    if not getattr(args, "use_bitnet", False):
        raise ConversionError(
            f"{ckpt_dir} is not a BitNet checkpoint (its args have use_bitnet="
            f"{getattr(args, 'use_bitnet', None)!r}); this tool exports --use-bitnet runs only "
            "(tools/checkpoint/falcon_h1_conversion.py megatron-to-hf converts full-precision "
            "Falcon-H1)"
        )
    detected = detect_model(args)
    model = detected if opts.model == "auto" else opts.model
    if model != detected:
        raise ConversionError(f"--model {model}, but the checkpoint's args describe a {detected}")
    rms = bool(getattr(args, "bitnet_rms_norm", False))
    if opts.format == "dense" and rms:
        raise ConversionError(
            "--format dense cannot represent --bitnet-rms-norm (a plain HF model has no "
            "per-linear input norm); use --format bitnet"
        )
    layout = "torch_dist" if is_dist else f"torch, TP={reader.tp} PP={reader.pp}"

    if model == "gpt":
        dims = check_gpt_args(args)
        src = _GptTorchDist(reader, dims, rms) if is_dist else _GptLegacy(reader, dims, rms)
        embed = src.embedding()
        padded = embed.shape[0]
        vocab = opts.vocab_size or padded
        if vocab > padded:
            raise ConversionError(f"--vocab-size {vocab} > the checkpoint's vocabulary {padded}")
        config = llama_config(dims, vocab)
        linears = [m for mods in GPT_HF_LINEARS.values() for m in mods]
        num_layers = dims.num_layers
        get_layer = lambda i: gpt_layer_to_hf(src.layer(i), dims, rms)  # noqa: E731
        names = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

        def tail():
            return src.final_norm(), src.output()[:vocab]

        embed = embed[:vocab]
    else:
        # The per-linear norms: column-parallel linears' are replicated over TP, row-parallel
        # ones' split like the input features (dim 0).
        norms = {_rms_key(lin): lin in FALCON_COLUMN_PARALLEL for lin in FALCON_HF_LINEARS}
        src = FalconH1Checkpoint(reader, opts.vocab_size, extra_layer_keys=norms if rms else None)
        config = src.config()
        linears = [m for mods in FALCON_HF_LINEARS.values() for m in mods]
        num_layers = src.dims.num_layers
        get_layer = lambda i: _falcon_layer(src, i, rms)  # noqa: E731
        names = (layouts.HF_EMBED, layouts.HF_FINAL_NORM, layouts.HF_LM_HEAD)
        tail = src.tail
        embed = src.embedding()
        vocab = src.dims.vocab

    stored = embed.dtype
    out_dtype = stored if opts.dtype == "auto" else _DTYPES[opts.dtype]
    if out_dtype not in _DTYPES.values():
        raise ConversionError(f"the checkpoint stores {stored}; pass --dtype bf16 or fp32")

    def conv(t: Tensor) -> Tensor:
        return t if t.dtype == out_dtype else t.to(out_dtype)

    if opts.format == "bitnet":
        config["quantization_config"] = quantization_config(opts, args)
    config["dtype"] = str(out_dtype).replace("torch.", "")
    _log(
        f"{model} BitNet checkpoint {ckpt_dir} ({layout}): {num_layers} layers, vocab {vocab}; "
        f"writing {opts.format} ({opts.linear_class if opts.format == 'bitnet' else 'beta*T'}) "
        f"{config['dtype']}"
    )
    stats = _Stats()
    with atomic_output_dir(Path(opts.save_dir), opts.force, [load_dir]) as out:
        writer = SafetensorsWriter(out, int(opts.max_shard_size * 2**30))
        writer.add(names[0], conv(embed))
        del embed
        bar = Progress(num_layers, "bitnet-hf-export", not opts.quiet)
        for i in range(num_layers):
            layer = get_layer(i)
            _write_layer(writer, f"model.layers.{i}.", layer, linears, opts, conv, out_dtype, stats)
            bar.update()
        bar.close()
        norm, head = tail()
        writer.add(names[1], conv(norm))
        writer.add(names[2], conv(head))
        writer.finish()
        with open(out / "config.json", "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    _log(
        f"wrote {opts.save_dir}: {stats.linears} ternary linears (beta in "
        f"[{min(stats.betas):.4g}, {max(stats.betas):.4g}]), {gib(writer.total_bytes)}"
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a Megatron BitNet b1.58 checkpoint to HF transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--load-dir", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--save-dir", required=True, help="HF directory to create")
    parser.add_argument(
        "--model",
        choices=("auto", "gpt", "falcon-h1"),
        default="auto",
        help="model family (auto: falcon-h1 if the args have a hybrid layer pattern, else gpt)",
    )
    parser.add_argument(
        "--format",
        choices=("bitnet", "dense"),
        default="bitnet",
        help="bitnet: transformers' packed ternary format; dense: plain weights beta*T",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto",) + tuple(_DTYPES),
        default="auto",
        help="dtype of the floating-point tensors (auto: as stored in the checkpoint)",
    )
    parser.add_argument(
        "--linear-class",
        choices=("bitlinear", "autobitlinear"),
        default="bitlinear",
        help="transformers' BitNet linear class (offline mode) for --format bitnet",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="keep this many vocabulary rows (default: GPT the padded vocabulary; Falcon-H1 the "
        "recorded HF config's, else args.vocab_size)",
    )
    parser.add_argument(
        "--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    return run_tool(export, opts, _log)


if __name__ == "__main__":
    sys.exit(main())
