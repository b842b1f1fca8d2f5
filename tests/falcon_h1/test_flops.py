"""The benchmark's FLOPs-per-token formula (scripts/falcon_h1/flops.py) against hand counts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _flops_module():
    name = "falcon_h1_flops"
    if name not in sys.modules:  # scripts/falcon_h1 is not a package; dataclasses need the module
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts/falcon_h1/flops.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TINY = dict(
    num_hidden_layers=1, hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=3,
    intermediate_size=5, vocab_size=7, mamba_n_heads=2, mamba_d_head=2, mamba_d_state=3,
    mamba_n_groups=1, mamba_chunk_size=4,
)


def test_tiny_model_by_hand():
    """Every term of a 1-layer model counted by hand (seq 6, chunk 4)."""
    flops = _flops_module()
    dims = flops.FalconH1Dims.from_hf_config(TINY)
    # q 4x6 + k 4x3 + v 4x3 + o 6x4 = 72; in_proj 4x(2*4 + 2*1*3 + 2) = 64; out_proj 4x4 = 16;
    # MLP 3x4x5 = 60; LM head 4x7 = 28.
    assert dims.matmul_params() == 72 + 64 + 16 + 60 + 28
    got = flops.training_flops_per_token(dims, seq_len=6)
    assert got["projections"] == 6 * 240
    assert got["attention"] == 3 * (2 * 2 * 3 * 7)  # 2 heads x head_dim 3 x (s + 1)
    # G N (Q+1) = 15, H P (Q+1) = 20, 4 H N P = 48
    assert got["ssd"] == 3 * (15 + 20 + 48)
    assert got["total"] == 1440 + 252 + 249


def test_chunk_longer_than_sequence_uses_the_sequence():
    flops = _flops_module()
    dims = flops.FalconH1Dims.from_hf_config(dict(TINY, mamba_chunk_size=128))
    # Q = min(128, 6) = 6: G N 7 + H P 7 + 48 = 21 + 28 + 48
    assert flops.training_flops_per_token(dims, seq_len=6)["ssd"] == 3 * (21 + 28 + 48)


def test_falcon_h1_0_5b_shape():
    """0.5B: 487,440,384 matmul weights (12,607,488 per layer x 36 + 1024 x 32784 LM head)."""
    flops = _flops_module()
    config = dict(
        num_hidden_layers=36, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=2048, vocab_size=32784, mamba_n_heads=24,
        mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_chunk_size=128,
    )
    dims = flops.FalconH1Dims.from_hf_config(config)
    # per layer: qkv 1024x768 + o 512x1024 + in_proj 1024x3352 + out 1536x1024 + MLP 3x1024x2048
    per_layer = 786_432 + 524_288 + 3_432_448 + 1_572_864 + 6_291_456
    assert per_layer == 12_607_488
    assert dims.matmul_params() == 36 * per_layer + 1024 * 32784 == 487_440_384
    total = flops.training_flops_per_token(dims, seq_len=2048)["total"]
    assert 3.2e9 < total < 3.3e9  # ~3.3 GFLOP/token as stated in issue 11
