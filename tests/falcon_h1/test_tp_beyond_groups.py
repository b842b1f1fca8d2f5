"""Falcon-H1 with one Mamba group (and 2 KV heads) at TP = 1, 2, 4: conversion and resharding.

A release-like tiny HF Falcon-H1 (``mamba_n_groups`` 1, gated RMSNorm on, all 14 multipliers
distinct; vocabulary 512 so that the padded vocabulary is the same at TP 1, 2 and 4) converted
to Megatron at TP 2 and 4, where the ranks share the Mamba group's B / C rows (and the
attention's KV heads): loaded the way ``pretrain_mamba.py --use-checkpoint-args`` loads it,
the logits equal HF's to fp32 round-off; Megatron's own ``torch_dist`` resharding of the
converter's one-process checkpoint gives exactly the converter's per-rank shards; what the
TP world saves converts back to the original HF tensors; and the ``torch_dist`` checkpoint
Megatron saved at TP=4 loads at TP=1 bit-identical to the TP=1 conversion
(TP1 -> TP4 -> TP1).
"""

from __future__ import annotations


import pytest
import torch
from conftest import checkpoint_tool
from falcon_h1.oracle import MULTIPLIERS, TinyShape, build_hf_model

pytestmark = pytest.mark.megatron

SHAPE = TinyShape(layers=2, mamba_groups=1, rms_norm=True, vocab=512)
SEQ_LEN = 21


@pytest.fixture(scope="module")
def tool():
    return checkpoint_tool("falcon_h1_conversion")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_g1")
    model = build_hf_model(SHAPE, MULTIPLIERS, seed=11)
    model.save_pretrained(directory)
    return directory, model


def _convert(tool, *argv) -> int:
    return tool.main([*map(str, argv), "--quiet"])


def _hf_to_mg(tool, hf_dir, out, tp, fmt):
    return _convert(
        tool, "hf-to-megatron", "--hf-dir", hf_dir, "--save-dir", out, "--target-tp", tp,
        "--target-pp", 1, "--ckpt-format", fmt,
    )  # fmt: skip


def _assert_same_hf(tool, saved, original, work):
    from safetensors.torch import load_file

    back = work / f"back_{saved.name}"
    assert _convert(tool, "megatron-to-hf", "--load-dir", saved, "--save-dir", back,
                    "--hf-config", original) == 0  # fmt: skip
    a, b = load_file(str(original / "model.safetensors")), {}
    for f in back.glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{saved.name}: {name} differs"


@pytest.fixture(scope="module")
def worlds(tool, hf, tmp_path_factory):
    """Run the TP=2 and TP=4 worlds (legacy + converter torch_dist, Megatron saves both), then
    a TP=1 world loading the TP=1 conversion and the torch_dist checkpoint saved at TP=4."""
    import torch.distributed as dist
    from falcon_h1 import conv_workers

    assert not dist.is_initialized()
    hf_dir, model = hf
    work = tmp_path_factory.mktemp("tp_beyond_groups")
    tokens = torch.randint(0, SHAPE.vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    positions = torch.arange(SEQ_LEN).unsqueeze(0).expand(2, -1)
    inputs = {"tokens": tokens, "positions": positions, "hf_logits": logits, "vocab": SHAPE.vocab}
    results = {}
    for tp in (2, 4):
        sub = work / f"tp{tp}"
        sub.mkdir()
        torch.save(inputs, sub / "inputs.pt")
        assert _hf_to_mg(tool, hf_dir, sub / "legacy", tp, "torch") == 0
        assert _hf_to_mg(tool, hf_dir, sub / "dist", tp, "torch_dist") == 0
        spec = {
            "work": str(sub),
            "legacy_dir": str(sub / "legacy"),
            "dist_dir": str(sub / "dist"),
            "megatron_dist_save": True,
        }
        results[tp] = conv_workers.run_world(tp, 1, spec)
    sub = work / "tp1"
    sub.mkdir()
    torch.save(inputs, sub / "inputs.pt")
    assert _hf_to_mg(tool, hf_dir, sub / "legacy", 1, "torch") == 0
    spec = {
        "work": str(sub),
        "legacy_dir": str(sub / "legacy"),
        "dist_dir": str(work / "tp4" / "megatron_dist_4x1"),
    }
    results[1] = conv_workers.run_world(1, 1, spec)
    return work, results


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_hf(worlds, tp):
    _, results = worlds
    diffs = [r["max_abs_diff"] for r in results[tp] if "max_abs_diff" in r]
    assert len(diffs) == 1 and diffs[0] <= 1e-5, diffs


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_resharding_equals_converter_shards(worlds, tp):
    _, results = worlds
    for r in results[tp]:
        assert r["torch_dist_mismatches"] == [], r["torch_dist_mismatches"]


@pytest.mark.parametrize("tp", [2, 4])
def test_checkpoints_saved_at_tp_convert_back(tool, hf, worlds, tp):
    work, _ = worlds
    for kind in ("legacy", "dist"):
        _assert_same_hf(tool, work / f"tp{tp}" / f"megatron_{kind}_{tp}x1", hf[0], work)


def test_tp4_checkpoint_loads_at_tp1_bit_identical(worlds):
    """The TP=1 world loaded the torch_dist checkpoint Megatron saved at TP=4 into the model
    it had loaded from the TP=1 conversion: every tensor equal (TP1 -> TP4 -> TP1)."""
    _, results = worlds
    (r,) = results[1]
    assert r["legacy_keys"] and r["torch_dist_mismatches"] == [], r["torch_dist_mismatches"]
