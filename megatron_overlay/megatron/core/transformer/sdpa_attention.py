# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (no Transformer Engine).

Drop-in for ``DotProductAttention`` / ``TEDotProductAttention`` in local (non-TE) specs. PyTorch
picks the kernel: flash or memory-efficient attention on GPUs, the math kernel on CPU.

Supports causal and padding masks (Megatron's boolean convention: ``True`` = masked out),
causal attention of fewer queries than keys (KV-cache decode and chunked prefill: the mask is
aligned to the last key, as in HF), grouped-query attention, additive attention bias, dropout,
and packed sequences in THD layout (a block-diagonal causal mask built from ``cu_seqlens``;
memory is quadratic in the packed length). Context parallelism is not supported.

On GPUs, plain causal self-attention (as many queries as keys, no extra mask or bias) passes
``is_causal=True`` and no mask, so PyTorch can take its flash kernel, and grouped-query
attention uses ``enable_gqa`` instead of copying K / V per query head.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPADotProductAttention(MegatronModule):
    """Core attention computed with PyTorch's ``scaled_dot_product_attention``.

    Inputs are ``[sq, b, np, hn]`` queries and ``[sk, b, ng, hn]`` keys / values (THD packed:
    ``[t, np, hn]``); the output is ``[sq, b, np * hn]`` (THD: ``[t, np * hn]``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPADotProductAttention does not support context parallelism "
                f"(--context-parallel-size {config.context_parallel_size}); use the Transformer "
                "Engine spec for CP."
            )
        if attention_type != "self":
            raise ValueError(
                f"SDPADotProductAttention supports self-attention only, got {attention_type}"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(head_dim)
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    @staticmethod
    def _causal_mask(sq: int, sk: int, device: torch.device) -> Tensor:
        """Boolean mask (True = attend) of causal attention aligned to the last key."""
        rows = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        cols = torch.arange(sk, device=device).unsqueeze(0)
        return cols <= rows

    @staticmethod
    def _packed_causal_mask(cu_seqlens: Tensor, total: int, device: torch.device) -> Tensor:
        """Block-diagonal causal mask (True = attend) for THD-packed sequences."""
        positions = torch.arange(total, device=device)
        segment = torch.searchsorted(cu_seqlens.to(device)[1:], positions, right=True)
        same = segment.unsqueeze(0) == segment.unsqueeze(1)
        return same & (positions.unsqueeze(0) <= positions.unsqueeze(1))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention of ``query`` over ``key`` / ``value``; see the class docstring for layouts."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.dropout_p if self.training else 0.0
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:
            # [t, n, d] -> [1, n, t, d]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            cu_q = packed_seq_params.cu_seqlens_q
            if cu_q is None:
                raise ValueError("packed (THD) attention needs packed_seq_params.cu_seqlens_q")
            mask = self._packed_causal_mask(cu_q, q.shape[2], q.device)
            if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
                raise ValueError(f"packed sequences need a causal mask type, got {mask_type}")
        else:
            # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            mask = None
            if mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
                mask = self._causal_mask(q.shape[2], k.shape[2], q.device)
            if attention_mask is not None:
                # Megatron masks are True where attention is NOT allowed; a causal mask from the
                # data pipeline combines with the causal mask type to the same result.
                keep = ~attention_mask.bool()
                mask = keep if mask is None else (mask & keep)
        num_heads, num_kv = q.shape[1], k.shape[1]
        if num_heads % num_kv != 0:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} kv heads")
        # On GPUs, plain causal attention goes to the flash kernel (no mask tensor, no K/V
        # copies). CPUs have no flash kernel: they keep the explicit-mask computation, whose
        # results the CPU tier's exact goldens and HF comparisons are recorded with.
        plain_causal = (
            q.is_cuda
            and not packed
            and mask_type == AttnMaskType.causal
            and attention_mask is None
            and attention_bias is None
            and q.shape[2] == k.shape[2]
        )
        if plain_causal:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=num_heads != num_kv,
            )
        else:
            attn_mask: Optional[Tensor] = mask
            if attention_bias is not None:
                bias = attention_bias.to(q.dtype)
                if mask is not None:
                    bias = bias.masked_fill(~mask, float("-inf"))
                attn_mask = bias
            if num_heads != num_kv:
                k = k.repeat_interleave(num_heads // num_kv, dim=1)
                v = v.repeat_interleave(num_heads // num_kv, dim=1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.softmax_scale
            )
        if packed:
            # [1, n, t, d] -> [t, n * d]
            return out.squeeze(0).transpose(0, 1).reshape(out.shape[2], -1)
        # [b, n, s, d] -> [s, b, n * d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
