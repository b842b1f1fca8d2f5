"""scripts/gpu/run_shards.py: a check run as parallel processes over case subsets, combined into
one report that passes only if every shard passed. CPU: the "check" is a small fake script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from project_paths import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu" / "run_shards.py"
FAKE_CHECK = '''
import argparse, json, sys
p = argparse.ArgumentParser(); p.add_argument("--cases"); p.add_argument("--out")
p.add_argument("--fail", default="")
a = p.parse_args()
cases = a.cases.split(",")
bad = [c for c in cases if c == a.fail]
summary = {"n_checks": 2 * len(cases), "n_passed": 2 * len(cases) - len(bad),
           "n_failed": len(bad), "failed": bad, "all_passed": not bad}
if a.fail != "noreport":
    open(a.out, "w").write(json.dumps({"summary": summary}))
sys.exit(1 if bad else 0)
'''


def _run(tmp_path: Path, shards: str, *extra: str):
    fake = tmp_path / "fake_check.py"
    fake.write_text(FAKE_CHECK)
    out = tmp_path / "r" / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--shards", shards, "--",
         sys.executable, str(fake), *extra],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return proc, out


def test_shards_combine(tmp_path):
    proc, out = _run(tmp_path, "a,b;c")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["pass"] is True and "commit" in report
    assert [s["cases"] for s in report["shards"]] == [["a", "b"], ["c"]]
    assert report["summary"] == {
        "n_checks": 6, "n_passed": 6, "n_failed": 0, "failed": [], "all_passed": True
    }
    assert (out.parent / "check.shard1.json").is_file() and (out.parent / "check.shard2.log").is_file()


def test_failing_shard_fails_the_whole(tmp_path):
    proc, out = _run(tmp_path, "a,b;c", "--fail", "c")
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert report["pass"] is False
    assert report["summary"]["failed"] == ["c"] and report["summary"]["all_passed"] is False
    assert [s["exit_status"] for s in report["shards"]] == [0, 1]


def test_missing_report_fails(tmp_path):
    proc, out = _run(tmp_path, "a;noreport", "--fail", "noreport")
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert report["shards"][1]["summary"] is None and "no readable report" in report["shards"][1]["problem"]


def test_shard_parsing():
    mod = load_script(SCRIPT)
    assert mod.parse_shards(" a, b ;c;") == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="more than one shard"):
        mod.parse_shards("a,b;b")
    with pytest.raises(ValueError, match="no cases"):
        mod.parse_shards(" ; ")
    assert mod.combine_summaries([{"n": 1, "l": ["x"], "ok": True}, {"n": 2, "l": [], "ok": False}]) == {
        "n": 3, "l": ["x"], "ok": False
    }
