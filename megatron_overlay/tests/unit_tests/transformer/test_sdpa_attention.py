# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""SDPADotProductAttention against a naive softmax(QK^T)V reference (CPU, fp64)."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.sdpa_attention import SDPADotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig


def _module(mask_type=AttnMaskType.causal, heads=4, groups=2, head_dim=8):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
    )
    return SDPADotProductAttention(config, 1, mask_type, "self")


def _reference(q, k, v, allowed):
    """q [sq,b,n,d], k/v [sk,b,g,d], allowed [b or 1, 1, sq, sk] bool -> [sq, b, n*d]."""
    n, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(n // g, dim=2)
    v = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bnqk,kbnd->qbnd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _qkv(sq, sk, b=2, n=4, g=2, d=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sq, b, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sk, b, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sk, b, g, d, generator=gen, dtype=torch.float64)
    return q, k, v


def test_causal_gqa():
    q, k, v = _qkv(7, 7)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    out = _module()(q, k, v, None)
    assert torch.allclose(out, _reference(q, k, v, allowed), atol=1e-12)


def test_plain_causal_takes_the_flash_eligible_call(monkeypatch):
    """On GPU: no materialised mask and no K/V copies (is_causal + enable_gqa, flash-eligible)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(7, 7)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the GPU branch
    _module()(q, k, v, None)
    ((q_shape, k_shape, kwargs),) = calls
    assert kwargs.get("attn_mask") is None and kwargs["is_causal"] is True
    assert kwargs["enable_gqa"] is True and k_shape[1] == 2 and q_shape[1] == 4


def test_fewer_queries_than_keys_aligns_to_last_key():
    """KV-cache decode / chunked prefill: query i sees keys up to i + (sk - sq)."""
    q, k, v = _qkv(3, 8)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()[-3:][None, None]
    out = _module()(q, k, v, None)
    assert torch.allclose(out, _reference(q, k, v, allowed), atol=1e-12)


def test_padding_mask_uses_megatron_convention():
    q, k, v = _qkv(6, 6)
    masked = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    masked[1, :, :, 4:] = True  # True = not allowed
    masked[..., 0] = False
    out = _module(AttnMaskType.padding)(q, k, v, masked)
    assert torch.allclose(out, _reference(q, k, v, ~masked), atol=1e-12)
    # A causal mask from the data pipeline combined with the causal type gives the same result.
    data_mask = ~torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    with pytest.warns(UserWarning, match="--no-create-attention-mask-in-dataloader"):
        with_data_mask = _module()(q, k, v, data_mask)
    assert torch.allclose(with_data_mask, _module()(q, k, v, None), atol=1e-12)


def test_mask_warning_only_for_a_mask_on_top_of_the_causal_type(recwarn):
    """A padding mask is the only mask of its type: no hint to drop it."""
    q, k, v = _qkv(6, 6)
    _module(AttnMaskType.padding)(q, k, v, torch.zeros(2, 1, 6, 6, dtype=torch.bool))
    _module()(q, k, v, None)
    assert not [w for w in recwarn if "attention-mask" in str(w.message)]


def test_packed_thd_equals_sequences_run_separately():
    lengths = [3, 5, 2]
    gen = torch.Generator().manual_seed(1)
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(total, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(total, 2, 8, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out = _module()(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, 32)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = _module()(q[start:end, None], k[start:end, None], v[start:end, None], None)
        assert torch.allclose(out[start:end], one[:, 0], atol=1e-12)


class _CPGroup:
    """Stand-in for a context-parallel process group (size and rank only)."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def _cp_module(cp_size, cp_rank, cp_comm_type=None):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        attention_dropout=0.0,
        context_parallel_size=cp_size,
    )
    pgs = SimpleNamespace(cp=_CPGroup(cp_size, cp_rank))
    return SDPADotProductAttention(
        config, 1, AttnMaskType.causal, "self", cp_comm_type=cp_comm_type, pg_collection=pgs
    )


def _cp_split(x, cp_size, rank):
    """Megatron's load-balanced split: chunks rank and 2 cp - 1 - rank of 2 cp."""
    chunks = x.chunk(2 * cp_size, dim=0)
    return torch.cat([chunks[rank], chunks[2 * cp_size - 1 - rank]])


@pytest.mark.parametrize("cp_size", [2, 3])
def test_context_parallel_equals_whole_sequence(monkeypatch, cp_size):
    """Each CP rank's output (its keys / values all-gathered over the ranks, emulated here)
    equals the whole-sequence attention at that rank's positions."""
    from megatron.core.tensor_parallel import mappings

    seq = 4 * cp_size
    q, k, v = _qkv(seq, seq)
    full = _module()(q, k, v, None)

    def all_gather(tensor, tensor_parallel_output_grad=True, group=None):
        whole = k if torch.equal(tensor, _cp_split(k, cp_size, group.rank())) else v
        return torch.cat([_cp_split(whole, cp_size, r) for r in range(cp_size)])

    monkeypatch.setattr(mappings, "gather_from_sequence_parallel_region", all_gather)
    for rank in range(cp_size):
        local = [_cp_split(x, cp_size, rank) for x in (q, k, v)]
        out = _cp_module(cp_size, rank)(*local, None)
        assert torch.allclose(out, _cp_split(full, cp_size, rank), atol=1e-12), rank


def test_context_parallel_refusals():
    """What the SDPA context-parallel path cannot do stops with the flag in the message."""
    with pytest.raises(ValueError, match="--cp-comm-type a2a"):
        _cp_module(2, 0, cp_comm_type="a2a")
    module = _cp_module(2, 0)
    q, k, v = _qkv(4, 4, b=1)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    with pytest.raises(ValueError, match="packed sequences .* --context-parallel-size 2"):
        module(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
    q, k, v = _qkv(1, 4)
    with pytest.raises(ValueError, match="run inference with --context-parallel-size 1"):
        module(q, k, v, None)
    q, k, v = _qkv(3, 3)
    with pytest.raises(ValueError, match="--seq-length must be a multiple of 2 x"):
        module(q, k, v, None)
