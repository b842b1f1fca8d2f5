# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Shared helpers of the BitNet layer tests: small configs, Megatron's fused-weight layouts, and
the explicit float64 reference of BitNet b1.58 (quantisation + identity STE):

* weight: ``beta = max(mean|W|, 1e-5)`` per logical matrix, ``T = clamp(round(W / beta), -1, 1)``;
* activation, per token: ``gamma = max(max|x|, 1e-5)``,
  ``Q = clamp(round(127 x / gamma), -128, 127)``;
* ``y = (gamma / 127) * beta * (Q T^T)``, gradients passed straight through (identity) to the
  full-precision input and weight.

Used by ``test_bitnet_layers.py`` and by the rank processes of ``test_bitnet_layers_tp.py``.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import numpy as np
import torch

U32 = 2.0**-24

# Tiny attention / MLP shapes: 4 query heads in 2 query groups (GQA), head dim 8 != hidden/heads.
HIDDEN = 40
HEADS = 4
GROUPS = 2
HEAD_DIM = 8
FFN = 24
QKV_OUT = (HEADS + 2 * GROUPS) * HEAD_DIM


def make_config(tp: int = 1, **overrides):
    """A CPU TransformerConfig for the layers, on the torch BitNet backend unless overridden.

    ``bitnet_*`` fields are set after construction (without ``use_bitnet``'s checks: the
    layers are built directly, not from a BitNet spec)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
    )
    extra = {"bitnet_backend": "torch"}
    extra.update({k: overrides.pop(k) for k in list(overrides) if k.startswith("bitnet_")})
    fields.update(overrides)
    config = TransformerConfig(**fields)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def config_with(config, **attrs):
    """Shallow copy of a config with attributes replaced (no __post_init__ re-validation)."""
    config = copy.copy(config)
    for key, value in attrs.items():
        setattr(config, key, value)
    return config


def init_normal(tensor):
    return torch.nn.init.normal_(tensor, std=0.02)


# --------------------------------------------------------------------------------------------
# Megatron layouts of fused weights
# --------------------------------------------------------------------------------------------


def segment_ids_full(role: str, out_rows: int, gated: bool = True) -> torch.Tensor:
    """Logical matrix of every row of the FULL (TP=1) weight."""
    if role == "linear_qkv":
        hpg = HEADS // GROUPS
        block = [0] * (hpg * HEAD_DIM) + [1] * HEAD_DIM + [2] * HEAD_DIM
        assert out_rows % len(block) == 0
        return torch.tensor(block * (out_rows // len(block)))
    if role == "linear_fc1" and gated:
        return torch.tensor([0] * (out_rows // 2) + [1] * (out_rows // 2))
    return torch.zeros(out_rows, dtype=torch.long)


def rank_rows(role: str, out_rows: int, tp: int, rank: int, gated: bool = True) -> torch.Tensor:
    """Rows of the full weight that rank ``rank`` of a column-parallel layer holds, in order.

    QKV: whole query groups, contiguous.  Gated fc1: the rank's chunk of gate, then its chunk of
    up.  Otherwise a contiguous chunk.
    """
    if role == "linear_fc1" and gated:
        half = out_rows // 2
        chunk = half // tp
        gate = torch.arange(rank * chunk, (rank + 1) * chunk)
        return torch.cat([gate, gate + half])
    chunk = out_rows // tp
    return torch.arange(rank * chunk, (rank + 1) * chunk)


# --------------------------------------------------------------------------------------------
# float64 reference (module docstring)
# --------------------------------------------------------------------------------------------


def _f32_div(a, b):
    """Correctly rounded fp32 quotient (float64 quotient of fp32 values rounded once)."""
    return (np.asarray(a, np.float64) / np.asarray(b, np.float64)).astype(np.float32)


def ref_weight(w: torch.Tensor, seg_ids: torch.Tensor):
    """(T int8 [N, K], beta per row fp32 [N]) with one beta per logical matrix (segment)."""
    w32 = w.detach().float().numpy()
    ids = seg_ids.numpy()
    beta = np.empty(w32.shape[0], dtype=np.float32)
    for s in np.unique(ids):
        rows = w32[ids == s].astype(np.float64)
        beta[ids == s] = max(np.float32(np.abs(rows).sum() / rows.size), np.float32(1e-5))
    t = np.clip(np.rint(_f32_div(w32, beta[:, None]).astype(np.float64)), -1, 1).astype(np.int8)
    return torch.from_numpy(t), torch.from_numpy(beta)


def ref_activation(x: torch.Tensor):
    """(Q int8 [M, K], gamma fp32 [M]) per token over the full row."""
    x32 = x.detach().float().reshape(-1, x.shape[-1]).numpy()
    gamma = np.maximum(np.abs(x32).max(axis=-1), np.float32(1e-5)).astype(np.float32)
    v = _f32_div((x32 * np.float32(127.0)).astype(np.float32), gamma[:, None])
    q = np.clip(np.rint(v.astype(np.float64)), -128, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(gamma)


def ref_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    seg_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dy: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """float64 BitNet linear and its identity-STE gradients.

    Returns a dict with ``y`` (shape ``[..., N]``, float64, bias included), ``y_nobias``, ``t``,
    ``beta`` (per row), ``q``, ``gamma`` and, if ``dy`` is given, ``dx`` (``dY @ W_q``),
    ``dw`` (``dY^T @ x_q``) and ``db``.
    """
    n, k = w.shape
    t, beta = ref_weight(w, seg_ids)
    q, gamma = ref_activation(x)
    wq = t.double() * beta.double()[:, None]
    xq = q.double() * (gamma.double() / 127.0)[:, None]
    # exact integer product, then the scales (float64: the reference has no cancellation error)
    acc = (q.to(torch.int64) @ t.to(torch.int64).t()).double()
    y = acc * (gamma.double() / 127.0)[:, None] * beta.double()[None, :]
    out = {"t": t, "beta": beta, "q": q, "gamma": gamma, "y_nobias": y.reshape(*x.shape[:-1], n)}
    if bias is not None:
        y = y + bias.detach().double()
    out["y"] = y.reshape(*x.shape[:-1], n)
    if dy is not None:
        g = dy.detach().double().reshape(-1, n)
        out["dx"] = (g @ wq).reshape(x.shape)
        out["dw"] = g.t() @ xq
        out["db"] = g.sum(0)
    return out


def assert_forward_close(y: torch.Tensor, ref: Dict[str, torch.Tensor], bias=None) -> None:
    """fp32 evaluation of the formula: a few roundings relative to each element."""
    y64 = ref["y"]
    mag = ref["y_nobias"].abs()
    if bias is not None:
        mag = mag + bias.detach().double().abs()
    err = (y.detach().double() - y64).abs()
    bound = 5 * U32 * mag + 1e-30
    assert torch.all(err <= bound), f"max excess {float((err - bound).max())}"


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    """Agreement relative to the reference's largest magnitude (sums of fp32 products)."""
    a = a.detach().double()
    b = b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(b.abs().max().clamp_min(1e-30))
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max abs err {err} > {rtol} * {scale}"
