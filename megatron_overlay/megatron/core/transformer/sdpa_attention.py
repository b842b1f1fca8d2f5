# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (no Transformer Engine).

Drop-in for ``DotProductAttention`` / ``TEDotProductAttention`` in local (non-TE) specs. PyTorch
picks the kernel: cuDNN, flash or memory-efficient attention on GPUs, the math kernel on CPU.

Supports causal and padding masks (Megatron's boolean convention: ``True`` = masked out),
causal attention of fewer queries than keys (KV-cache decode and chunked prefill: the mask is
aligned to the last key, as in HF), grouped-query attention, additive attention bias, dropout,
and packed sequences in THD layout (a block-diagonal causal mask built from ``cu_seqlens``;
memory is quadratic in the packed length).

Context parallelism (``--context-parallel-size``) with Megatron's load-balanced sequence split
(CP rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` of ``2 * cp``): the keys and values of
the CP ranks are all-gathered (backward: reduce-scattered) and put back in sequence order, and
each rank's queries attend to them with a causal mask built from their positions in the whole
sequence. Memory is quadratic in the local query length times the whole sequence length; packed
sequences (THD) and inference are not supported under context parallelism (clear errors).

On GPUs, plain causal self-attention (as many queries as keys, no extra mask or bias) passes
``is_causal=True`` and no mask, so PyTorch can take a fused kernel (cuDNN attention first, then
flash), and grouped-query attention uses ``enable_gqa`` instead of copying K / V per query head.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

# Kernel order for plain causal attention on GPUs. Inside a training step PyTorch's default
# order ran its flash kernel, where cuDNN's fused attention measured 0.24 vs 0.39 ms fwd+bwd
# (batch 4, 2048 tokens, 8 query / 2 KV heads of 64, CUDA-graph replays on an H200); a
# backend that cannot take the inputs is skipped, so the others remain fallbacks.
_CAUSAL_GPU_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


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
        self.cp_group = None
        if config.context_parallel_size > 1:
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
            self.cp_group = pg_collection.cp
            if cp_comm_type not in (None, "p2p", "all_gather"):
                raise ValueError(
                    f"--cp-comm-type {cp_comm_type} is not supported by SDPADotProductAttention "
                    "(it all-gathers keys and values across the context-parallel ranks); use "
                    "the default p2p or all_gather, or the Transformer Engine spec"
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
        cp_positions = None
        if self.cp_group is not None and self.cp_group.size() > 1:
            if packed:
                raise ValueError(
                    "SDPADotProductAttention does not support packed sequences (THD) with "
                    f"--context-parallel-size {self.cp_group.size()}; use the Transformer "
                    "Engine spec, or --context-parallel-size 1"
                )
            if query.shape[0] != key.shape[0]:
                raise ValueError(
                    "SDPADotProductAttention with --context-parallel-size "
                    f"{self.cp_group.size()} computes training / prefill attention only "
                    f"({query.shape[0]} queries, {key.shape[0]} keys); run inference with "
                    "--context-parallel-size 1"
                )
            key, value, cp_positions = _gather_context_parallel_kv(key, value, self.cp_group)
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
                if cp_positions is None:
                    mask = self._causal_mask(q.shape[2], k.shape[2], q.device)
                else:
                    # This rank's queries at their positions in the whole sequence.
                    keys = torch.arange(k.shape[2], device=q.device)
                    mask = keys.unsqueeze(0) <= cp_positions.to(q.device).unsqueeze(1)
            if attention_mask is not None:
                if mask_type == AttnMaskType.causal:
                    warnings.warn(
                        "SDPADotProductAttention got an attention mask with the causal mask "
                        "type: it applies both, which keeps PyTorch off its flash kernel and "
                        "copies K/V per query head; unless the data needs document-wise masks "
                        "(--reset-attention-mask), train with "
                        "--no-create-attention-mask-in-dataloader",
                        stacklevel=2,
                    )
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
            and cp_positions is None
        )
        if plain_causal:
            with sdpa_kernel(_CAUSAL_GPU_PRIORITY, set_priority=True):
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


def context_parallel_positions(local_len: int, cp_size: int, cp_rank: int) -> Tensor:
    """Positions in the whole sequence of the ``local_len`` tokens that context-parallel rank
    ``cp_rank`` holds: chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``
    (Megatron's load-balanced split, ``get_batch_on_this_cp_rank``)."""
    if local_len % 2 != 0:
        raise ValueError(
            f"a context-parallel rank holds two equal chunks, got {local_len} tokens: "
            f"--seq-length must be a multiple of 2 x --context-parallel-size ({2 * cp_size})"
        )
    chunk = local_len // 2
    first = torch.arange(chunk) + cp_rank * chunk
    second = torch.arange(chunk) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def _gather_context_parallel_kv(key: Tensor, value: Tensor, cp_group):
    """All-gather ``[s_local, b, ng, hn]`` keys and values over ``cp_group`` into
    ``[s_local * cp, b, ng, hn]`` in sequence order (backward: each rank's slice gets the sum of
    every rank's gradient); also returns this rank's query positions."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    local = key.shape[0]
    chunk = local // 2
    positions = context_parallel_positions(local, cp_size, cp_rank)
    # Gathered chunk 2 * r + h (rank r, half h) is chunk r (h = 0) or 2 cp - 1 - r (h = 1) of
    # the sequence: pick them in sequence order.
    order = [2 * c if c < cp_size else 2 * (2 * cp_size - 1 - c) + 1 for c in range(2 * cp_size)]
    index = torch.tensor(order, device=key.device)
    out = []
    for tensor in (key, value):
        gathered = gather_from_sequence_parallel_region(
            tensor.contiguous(), tensor_parallel_output_grad=True, group=cp_group
        )
        chunks = gathered.view(2 * cp_size, chunk, *tensor.shape[1:])
        out.append(chunks.index_select(0, index).reshape(cp_size * local, *tensor.shape[1:]))
    return out[0], out[1], positions
