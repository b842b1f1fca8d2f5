"""Training FLOPs per token of a Falcon-H1 model, from its HF ``config.json`` fields.

One formula, applied identically to every system a benchmark compares (the model is the same,
so the count is the same; MFU ratios then equal throughput ratios). Counted, for one training
step (forward + backward = 3 x forward; the backward of a product costs two products):

* **projections**: ``6 * N`` per token, N = matmul weights a token passes through: per layer
  q/k/v + attention output, Mamba in_proj [z, x, B, C, dt] + out_proj, gate/up/down of the MLP;
  plus the LM head. Embedding lookups, convolutions, norms and elementwise work are not counted.
* **attention** (causal): per layer and token ``2 * heads * head_dim * (s + 1) / 2`` multiply-adds
  for QK^T and the same for AV: forward ``2 * heads * head_dim * (s + 1)`` FLOPs; x3 for training.
* **SSD** (Mamba-2 chunked scan, chunk Q, only the causal part of each chunk): per layer and
  token, forward ``G*N*(Q+1)`` (C B^T within the chunk) + ``H*P*(Q+1)`` (decay-masked scores
  times X) + ``2*H*N*P`` (chunk state B^T X) + ``2*H*N*P`` (C times the carried state); x3.

Symbols: s sequence length, H Mamba heads, P Mamba head dim, N state size, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class FalconH1Dims:
    """The shape fields the FLOPs count needs (names as in HF ``FalconH1Config``)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    mamba_heads: int
    mamba_head_dim: int
    d_state: int
    groups: int
    chunk: int

    @classmethod
    def from_hf_config(cls, config: Mapping) -> "FalconH1Dims":
        """Dims from an HF Falcon-H1 config mapping (``config.json`` contents)."""
        heads = int(config["num_attention_heads"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            ffn=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            mamba_heads=int(config["mamba_n_heads"]),
            mamba_head_dim=int(config["mamba_d_head"]),
            d_state=int(config["mamba_d_state"]),
            groups=int(config["mamba_n_groups"]),
            chunk=int(config["mamba_chunk_size"]),
        )

    @property
    def d_ssm(self) -> int:
        """Mamba inner width (heads x head dim)."""
        return self.mamba_heads * self.mamba_head_dim

    def matmul_params(self) -> int:
        """Weights of every projection a token passes through (layers + LM head)."""
        h = self.hidden
        attention = h * (self.heads + 2 * self.kv_heads) * self.head_dim
        attention += self.heads * self.head_dim * h
        in_proj = h * (2 * self.d_ssm + 2 * self.groups * self.d_state + self.mamba_heads)
        mamba = in_proj + self.d_ssm * h
        mlp = 3 * h * self.ffn
        return self.layers * (attention + mamba + mlp) + h * self.vocab


def training_flops_per_token(dims: FalconH1Dims, seq_len: int) -> dict[str, float]:
    """FLOPs of one training step per token: ``{projections, attention, ssd, total}``."""
    projections = 6.0 * dims.matmul_params()
    attention_fwd = 2.0 * dims.heads * dims.head_dim * (seq_len + 1)
    q = min(dims.chunk, seq_len)
    ssd_fwd = (
        dims.groups * dims.d_state * (q + 1)
        + dims.mamba_heads * dims.mamba_head_dim * (q + 1)
        + 4.0 * dims.mamba_heads * dims.d_state * dims.mamba_head_dim
    )
    attention = 3.0 * dims.layers * attention_fwd
    ssd = 3.0 * dims.layers * ssd_fwd
    return {
        "projections": projections,
        "attention": attention,
        "ssd": ssd,
        "total": projections + attention + ssd,
    }
