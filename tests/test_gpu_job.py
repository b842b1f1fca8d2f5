"""The GPU job is green or named: run_gpu_tests.sh exits non-zero when a step fails, and
summary.json records every step's status and pass/fail counts (scripts/gpu/gpu_job_summary.py).
Runs on CPU: the steps used here fail or are fabricated, no GPU is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHA = "0123456789abcdef0123456789abcdef01234567"


def _summarise(tmp_path: Path, steps: list[tuple[str, int, dict | None]]):
    env = tmp_path / "environment.json"
    env.write_text(json.dumps({"commit": SHA, "dirty": False, "describe": "x"}))
    lines = []
    for name, rc, report in steps:
        path = tmp_path / f"{name}.json"
        if report is not None:
            path.write_text(json.dumps(report))
        lines.append(f"{name}\t{rc}\t3\t{path}")
    table = tmp_path / "steps.tsv"
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu/gpu_job_summary.py"), "--steps", str(table),
         "--environment", str(env), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    return proc.returncode, json.loads(out.read_text())


def _report(**summary):
    return {"commit": SHA, "dirty": False, "summary": summary} if summary else {
        "commit": SHA, "dirty": False}


def test_all_green(tmp_path):
    rc, summary = _summarise(tmp_path, [
        ("check", 0, _report(n_checks=10, n_passed=8, n_failed=0, n_known_failures=2,
                             known_failures=["conv bwd: kernel"])),
        ("bench", 0, _report()),
    ])  # fmt: skip
    assert rc == 0, summary
    assert summary["commit"] == SHA and summary["failed_steps"] == []
    check, bench = summary["steps"]
    assert check["counts"] == {"n_checks": 10, "n_passed": 8, "n_failed": 0, "n_known_failures": 2}
    assert check["known_failures"] == ["conv bwd: kernel"]
    assert bench["counts"] is None and bench["status"] == "passed"


def test_failures_are_named(tmp_path):
    rc, summary = _summarise(tmp_path, [
        ("exit1", 1, _report(n_checks=3, n_passed=2, n_failed=1)),
        ("timeout", 124, None),
        ("lies", 0, _report(n_checks=3, n_passed=2, n_failed=1)),  # exit 0 but a failed check
        ("noprov", 0, {"summary": {"n_checks": 1, "n_passed": 1, "n_failed": 0}}),
        ("ok", 0, _report(n_checks=1, n_passed=1, n_failed=0)),
    ])  # fmt: skip
    assert rc == 1
    assert summary["failed_steps"] == ["exit1", "timeout", "lies", "noprov"]
    problems = {s["step"]: " ".join(s.get("problems", [])) for s in summary["steps"]}
    assert "exit status 1" in problems["exit1"]
    assert "timed out" in problems["timeout"] and "no report" in problems["timeout"]
    assert "1 failed checks" in problems["lies"]
    assert "provenance" in problems["noprov"]
    assert problems["ok"] == ""


def test_run_gpu_tests_exits_nonzero_on_a_failed_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PATH=f"{Path(sys.executable).parent}:"
               + os.environ["PATH"])  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu/run_gpu_tests.sh"), str(out), "no-such-step"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "SOME STEPS FAILED" in proc.stdout
    environment = json.loads((out / "environment.json").read_text())
    assert "commit" in environment and "dirty" in environment
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_steps"] == ["no-such-step"]
    assert summary["commit"] == environment["commit"]


def _unit_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_gpu_unit_tests", ROOT / "scripts/gpu/run_gpu_unit_tests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_step_counts_outcomes_from_junit(tmp_path):
    """The GPU unit-test step's report: every JUnit case with its outcome, counted."""
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="boom">x</failure></testcase>'
        '<testcase classname="a" name="err"><error message="setup">x</error></testcase>'
        '<testcase classname="b" name="skip"><skipped message="needs X"/></testcase>'
        "</testsuite></testsuites>"
    )
    runner = _unit_runner()
    cases = runner.outcomes(xml)
    assert [c["outcome"] for c in cases] == ["passed", "failed", "error", "skipped"]
    assert cases[1]["message"] == "boom" and cases[0]["test"] == "a::ok"
    assert runner.summarise(cases) == {
        "n_checks": 4, "n_passed": 1, "n_failed": 1, "n_errors": 1, "n_skipped": 1
    }
