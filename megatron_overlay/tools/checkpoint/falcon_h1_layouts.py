# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Falcon-H1 tensor layouts: HF transformers <-> Megatron, as pure tensor functions.

The shapes of a model (:class:`FalconH1Dims`), the tensor names on both sides, and how each
tensor is split over tensor-parallel ranks and merged back. Nothing here reads files or imports
Megatron, so the layouts can be tested on their own and reused by other tools.

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

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from conversion_io import ConversionError

Tensor = torch.Tensor


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
