"""scripts/gpu/check_mamba2_torch.py on CPU (--dry-run-cpu: our torch ops stand in for the
kernels): the report, its verdicts against the naive reference, known-failure bookkeeping, and
that a wrong "kernel" turns the exit status red with the failing checks named."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu" / "check_mamba2_torch.py"
SMALL = ["--dry-run-cpu", "--no-timing", "--dtypes", "float32", "--ngroups", "2"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("check_mamba2_torch_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, monkeypatch, out, *extra):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), *SMALL, *extra])
    rc = script.main()
    return rc, json.loads(out.read_text())


def test_dry_run_passes_with_provenance(script, monkeypatch, tmp_path):
    rc, report = _run(script, monkeypatch, tmp_path / "r.json", "--cases",
                      "conv_seq_idx,conv_init_final,scan_seq_idx,split_norm_outproj_states")
    assert rc == 0, report["summary"]
    assert report["naive_selfcheck"] == {"scan": True, "conv": True}
    assert report["summary"]["n_failed"] == 0 and report["summary"]["n_known_failures"] == 0
    assert report["summary"]["n_checks"] == report["summary"]["n_passed"] > 20
    assert len(report["commit"]) == 40 and isinstance(report["dirty"], bool)
    tensors = {(r["case"], r["tensor"]) for r in report["results"]}
    assert ("conv_seq_idx", "grad:x") in tensors and ("scan_seq_idx", "grad:init") in tensors
    rels = [r["rel_torch_vs_naive"] for r in report["results"]]
    assert max(rels) <= 1e-4  # float32 against the float64 reference
    assert sum(rel > 0 for rel in rels) > len(rels) // 2  # a reference, not our op again


def test_wrong_kernel_is_named_and_red(script, monkeypatch, tmp_path):
    """A "kernel" whose conv ignores the bias fails against the reference; our op does not."""
    real = script.dry_run_kernel_ops

    def broken(m2):
        ops = real(m2)
        conv = ops.conv
        ops.conv = lambda x, w, b=None, *a, **k: conv(x, w, None, *a, **k)
        return ops

    monkeypatch.setattr(script, "dry_run_kernel_ops", broken)
    rc, report = _run(script, monkeypatch, tmp_path / "r.json", "--cases", "conv_plain,scan_basic")
    assert rc == 1
    failed = [r for r in report["results"] if r["status"] == "FAIL"]
    assert failed and {r["case"] for r in failed} == {"conv_plain"}
    assert all(r["failing"] == ["kernel"] for r in failed)
    assert "conv_plain out (kernel)" in report["summary"]["failed"]


def test_reference_is_independent_of_our_op(script, monkeypatch, tmp_path):
    """If our op itself is wrong, the reference says so (our op run in float64, the old
    "reference", would agree with it)."""
    real = script.torch_ops

    def broken(m2):
        ops = real(m2)
        conv = ops.conv
        ops.conv = lambda x, w, b=None, *a, **k: conv(x, w, None, *a, **k)
        return ops

    monkeypatch.setattr(script, "torch_ops", broken)  # our op and the dry run's "kernel"
    rc, report = _run(script, monkeypatch, tmp_path / "r.json", "--cases", "conv_plain")
    assert rc == 1
    failing = {tuple(r["failing"]) for r in report["results"] if r["tensor"] == "out"}
    assert failing == {("torch", "kernel")}


def test_known_failures_need_our_op_to_agree(script):
    entry = script.KNOWN_FAILURES[0]
    case, tensor = entry["cases"][0], entry["tensors"][0]
    assert script.known_failure(case, tensor, ["kernel"], real_kernels=True) == 0
    assert script.known_failure(case, tensor, ["torch", "kernel"], True) is None  # ours off too
    assert script.known_failure(case, tensor, ["torch"], True) is None
    assert script.known_failure(case, tensor, ["kernel"], real_kernels=False) is None  # dry run
    assert script.known_failure("scan_basic", tensor, ["kernel"], True) is None
    for e in script.KNOWN_FAILURES:
        assert e["reason"] and e["impl"] == "kernel" and e["cases"] and e["tensors"]


def test_stale_known_failures(script):
    case = script.KNOWN_FAILURES[0]["cases"][0]
    ran_clean = [{"case": case, "status": "pass"}]
    assert 0 in script.stale_known_failures(ran_clean, real_kernels=True)
    assert script.stale_known_failures(ran_clean, real_kernels=False) == []
    matched = [{"case": case, "status": "known_failure", "known_failure": 0}]
    assert 0 not in script.stale_known_failures(matched, real_kernels=True)
    assert script.stale_known_failures([{"case": "scan_basic"}], True) == []  # case not run


def test_naive_ops_match_the_kernel_signatures(script):
    """The adapter behind the kernels' signatures gives the reference's values (float64)."""
    nv = script.load_naive()
    naive = script.naive_ops(nv)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, generator=gen, dtype=torch.float64)
    state = torch.randn(2, 8, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    new_state = state.clone()
    out = naive.conv_update(x[:, 0], new_state, w, None, "silu")
    ref = nv.naive_conv(x.transpose(1, 2), w, initial_states=state[..., 1:], activation="silu")
    torch.testing.assert_close(out, ref[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(new_state, torch.cat([state[..., 1:], x.transpose(1, 2)], -1))
