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


@pytest.mark.megatron
def test_fold_sections_agree_bitwise_in_tritons_interpreter(megatron_tree, tmp_path):
    """The fold, accumulation and fold-into-main_grad cases on CPU (a fresh process with
    TRITON_INTERPRET=1, tiny weight): every variant gives PyTorch's bits, and the one-pass
    variant did add in the backward."""
    import os
    import subprocess
    import sys

    script = bench.REPO / "scripts" / "gpu" / "bench_layout_swap.py"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(megatron_tree), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(script), "--out-dir", str(tmp_path), "--shapes", "tiny"]
    cmd += ["--fold-on-cpu", "--fold-weights", "tiny"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_layout_swap.json").read_text())
    assert set(report["fold_accumulate"]["tiny"]) == {"torch", "two_passes", "one_pass"}
    for section in ("fold", "accumulate", "fold_accumulate"):
        for case in report[section]["tiny"].values():
            assert case["bit_identical_to_torch"] is True, (section, case)
    assert report["fold_accumulate"]["tiny"]["one_pass"]["added_in_backward"] is True
