"""scripts/gpu/bench_layout_swap.py on CPU: both cases give the same bits, and a broken layout
function is reported as such (the check can fail)."""

from __future__ import annotations

import json

import pytest
import torch
from project_paths import load_script

bench = load_script("scripts/gpu/bench_layout_swap.py")


@pytest.mark.megatron
def test_swap_and_transpose_agree_bitwise_in_the_layer_step(megatron_tree, tmp_path):
    assert bench.main(["--out-dir", str(tmp_path), "--shapes", "tiny"]) == 0
    report = json.loads((tmp_path / "bench_layout_swap.json").read_text())
    cases = report["shapes"]["tiny"]["cases"]
    assert set(cases) == {"transpose", "swap"}
    assert all(c["bit_identical_to_transpose"] for c in cases.values())
    assert report["summary"] == {"passed": 1, "failed": 0} and "commit" in report


@pytest.mark.megatron
def test_a_wrong_layout_is_caught(megatron_tree, tmp_path, monkeypatch):
    real = bench.layout_function
    monkeypatch.setattr(
        bench,
        "layout_function",
        lambda case: (lambda t: t.clone()) if case == "swap" else real(case),
    )
    monkeypatch.setitem(bench.SHAPES, "tiny", (4, 4, 8))  # square: a missing swap keeps shapes
    assert bench.main(["--out-dir", str(tmp_path), "--shapes", "tiny"]) == 1
    cases = json.loads((tmp_path / "bench_layout_swap.json").read_text())["shapes"]["tiny"]
    assert cases["cases"]["swap"]["bit_identical_to_transpose"] is False


def test_transpose_case_is_the_plain_copy():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(bench.layout_function("transpose")(x), x.transpose(0, 1).contiguous())
