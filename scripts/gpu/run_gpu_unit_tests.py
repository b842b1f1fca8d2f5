#!/usr/bin/env python3
"""Run overlay unit tests on the GPU machine and write a JSON report of their outcomes.

CI has no GPU, so tests whose CUDA paths matter (the BitNet Triton kernels compiled rather than
interpreted, the ``gpu``-marked tests) run here, in the patched tree, through pytest with a
JUnit XML file. The report carries the provenance (scripts/lib/provenance.py), every test's
outcome and a ``summary`` (``n_checks``, ``n_passed``, ``n_failed``, ``n_errors``,
``n_skipped``) that scripts/gpu/gpu_job_summary.py reads. A run where no test passed, or any
failed or errored, exits non-zero.

pytest runs with ``MAMBA_DETERMINISTIC=1`` unless the caller sets it: mamba_ssm then reduces
without atomic adds (tests compare its kernels bit for bit) and keeps one configuration per
autotuner, so a cold machine compiles one kernel per shape instead of every configuration.

Usage::

    python scripts/gpu/run_gpu_unit_tests.py --megatron build/Megatron-LM --out unit_gpu.json \
        [tests/unit_tests/bitnet ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from provenance import provenance  # noqa: E402

# The tests whose GPU paths matter: the Triton kernels compiled (on CPU CI they run in Triton's
# interpreter) and the `gpu`-marked ones. The rest of the BitNet tests are CPU tests (a gloo
# world on CPU tensors): on a CUDA machine they are not meant to run (one crashed the process).
DEFAULT_TESTS = [
    "tests/unit_tests/bitnet/test_triton_kernels.py",
    "tests/unit_tests/bitnet/test_backend.py",
    "tests/unit_tests/bitnet/test_quant_reference.py",
    "tests/unit_tests/training/test_logged_statistics.py",
    "tests/unit_tests/fusions/test_triton_cross_entropy.py",
    "tests/unit_tests/fusions/test_triton_rope.py",
    "tests/unit_tests/optimizer/test_param_copy.py",
    "tests/unit_tests/fusions/test_triton_row_scale.py",
    "tests/unit_tests/fusions/test_triton_grad_accumulation.py",
    "tests/unit_tests/ssm/test_batch_first_layout.py",
    # Its GPU tests only (the CPU ones run mamba_ssm in Triton's interpreter, in CI).
    "tests/unit_tests/ssm/test_mamba_keep_activations.py::"
    "test_cuda_kernels_match_mamba_split_conv1d_scan_combined",
    "tests/unit_tests/ssm/test_mamba_keep_activations.py::"
    "test_mixer_with_the_flag_trains_the_same_bits",
]


def outcomes(junit_xml: Path) -> list[dict]:
    """One record per test case of a JUnit XML file: name and passed / failed / error /
    skipped (with pytest's message for the last three)."""
    cases = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (node.get("message") or "")[:300]
                break
        cases.append({"test": name, "outcome": outcome, "message": message})
    return cases


def summarise(cases: list[dict]) -> dict:
    """Counts of ``cases`` in the keys gpu_job_summary.py reads."""

    def count(outcome: str) -> int:
        return sum(c["outcome"] == outcome for c in cases)

    return {
        "n_checks": len(cases),
        "n_passed": count("passed"),
        "n_failed": count("failed"),
        "n_errors": count("error"),
        "n_skipped": count("skipped"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron", type=Path, required=True, help="the patched tree")
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS, help="paths in the tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
        cmd += [f"--junitxml={junit}", *args.tests]
        env = dict(os.environ)
        env.setdefault("MAMBA_DETERMINISTIC", "1")
        rc = subprocess.run(cmd, cwd=args.megatron, env=env).returncode
        cases = outcomes(junit) if junit.is_file() else []
    summary = summarise(cases)
    tree = ROOT / ".carry" / "tree.txt"  # the carried tree's revision (prepare_carry.sh)
    report = {
        **provenance(sys.argv),
        "megatron_tree": tree.read_text().strip() if tree.is_file() else str(args.megatron),
        "pytest_exit_status": rc,
        "tests": args.tests,
        "summary": summary,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[unit] {json.dumps(summary)} -> {args.out}")
    ok = rc == 0 and summary["n_passed"] > 0 and not (summary["n_failed"] or summary["n_errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
