#!/usr/bin/env python3
"""Summary of a GPU job (scripts/gpu/run_gpu_tests.sh): one record per step, green or named.

Reads the job's step table (name, exit status, seconds, report path; tab-separated) and each
step's JSON report, and writes ``summary.json``: the job's provenance (from environment.json)
and per step its status, time, exit status and the pass/fail counts of its report's
``summary`` (``n_checks``, ``n_passed``, ``n_failed``, and where the step declares them
``n_known_failures`` with their names). A step counts as passed only if it exited 0, wrote its
report, the report carries a commit, and its counts show no unexpected failure. Exit status 0
only if every step passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COUNT_KEYS = ("n_checks", "n_passed", "n_failed", "n_known_failures", "n_errors")


def step_record(name: str, rc: int, seconds: int, report: str) -> dict:
    rec: dict = {"step": name, "exit_status": rc, "seconds": seconds, "report": report}
    problems = []
    if rc == 124:
        problems.append("timed out")
    elif rc != 0:
        problems.append(f"exit status {rc}")
    data = None
    if report == "-":
        problems.append("unknown step")
    elif not Path(report).is_file():
        problems.append(f"no report {report}")
    else:
        try:
            data = json.loads(Path(report).read_text())
        except ValueError as exc:
            problems.append(f"report is not JSON ({exc})")
    if data is not None:
        rec["commit"] = data.get("commit", "missing")
        rec["dirty"] = data.get("dirty", "missing")
        if "commit" not in data or "dirty" not in data:
            problems.append("report has no commit/dirty provenance")
        summary = data.get("summary")
        if isinstance(summary, dict):
            rec["counts"] = {k: summary[k] for k in COUNT_KEYS if k in summary}
            if summary.get("known_failures"):
                rec["known_failures"] = summary["known_failures"]
            if summary.get("n_failed", 0) or summary.get("n_errors", 0):
                problems.append(
                    f"{summary.get('n_failed', 0)} failed checks, "
                    f"{summary.get('n_errors', 0)} errors"
                )
        else:
            rec["counts"] = None  # a benchmark: it passes by running to the end
    rec["status"] = "failed" if problems else "passed"
    if problems:
        rec["problems"] = problems
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", required=True, help="tab-separated: name, rc, seconds, report")
    parser.add_argument("--environment", required=True, help="environment.json (provenance)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        environment = json.loads(Path(args.environment).read_text())
    except (OSError, ValueError) as exc:
        environment = {"error": f"{args.environment}: {exc}"}
    steps = []
    for line in Path(args.steps).read_text().splitlines():
        if line.strip():
            name, rc, seconds, report = line.split("\t")
            steps.append(step_record(name, int(rc), int(seconds), report))
    failed = [s["step"] for s in steps if s["status"] != "passed"]
    summary = {
        **{k: environment.get(k) for k in ("commit", "dirty", "describe", "provenance_source")},
        "environment": environment,
        "n_steps": len(steps),
        "n_passed": len(steps) - len(failed),
        "n_failed": len(failed),
        "failed_steps": failed,
        "steps": steps,
    }
    if "provenance_warning" in environment:
        summary["provenance_warning"] = environment["provenance_warning"]
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for s in steps:
        counts = s.get("counts")
        if counts:
            text = ", ".join(f"{k[2:]} {v}" for k, v in counts.items())
        else:
            text = "no counts (benchmark)" if s["status"] == "passed" else "no counts"
        extra = f" -- {'; '.join(s['problems'])}" if "problems" in s else ""
        print(f"{s['step']:10s} {s['status']:6s} {s['seconds']:5d} s  {text}{extra}")
    return 1 if failed or not steps else 0


if __name__ == "__main__":
    sys.exit(main())
