"""The Makefile targets drive scripts/patchset.py (run on the throwaway project)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from patchset_testlib import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(p, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(p.env)
    full_env.update(env or {})
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(p.root), f"PYTHON={sys.executable}", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_make_targets(bare_proj):
    p = bare_proj
    shutil.copy2(REPO_ROOT / "Makefile", p.root / "Makefile")
    # Only MEGATRON_LM_GIT can provide the pin: its url in UPSTREAM leads nowhere.
    pin = p.root / "UPSTREAM"
    pin.write_text(pin.read_text().replace(str(p.upstream), "/nonexistent"))

    proc = make(p, "upstream", env={"MEGATRON_LM_GIT": str(p.upstream)})
    assert proc.returncode == 0, proc.stderr
    proc = make(p, "apply-patches")
    assert proc.returncode == 0, proc.stderr
    assert (p.build / "megatron/core/alpha/hook.py").is_file()
    # make's built-in LINT (= lint) and a LINT in the environment are not the switch.
    (p.root / "requirements").mkdir()
    shutil.copy2(REPO_ROOT / "requirements/lint.txt", p.root / "requirements/lint.txt")
    for env in ({}, {"LINT": "splint"}):
        dry = make(p, "-n", "check-patches", env=env)
        assert '--lint "strict"' in dry.stdout, dry.stdout + dry.stderr
    assert '--lint "report"' in make(p, "-n", "check-patches", "LINT=report").stdout
    proc = make(
        p, "check-patches", "LINT=off"
    )  # the lint tools: tests/tooling/test_upstream_lint.py
    assert proc.returncode == 0 and "[check] OK" in proc.stdout, proc.stderr

    proc = make(p, "pr-branch")
    assert proc.returncode == 2 and "usage: make pr-branch FEATURE=<name>" in proc.stderr
    proc = make(p, "pr-branch", "FEATURE=beta")
    assert proc.returncode == 0, proc.stderr
    assert p.bgit("rev-parse", "--verify", "-q", "pr/beta")
    proc = make(p, "rebase-upstream")
    assert proc.returncode == 2 and "UPSTREAM_MAIN" in proc.stderr  # no second base here

    # Unexported work: apply and clean refuse, DISCARD=1 sets it aside, FORCE=1 lets export win.
    mine = p.commit_in_build({"megatron/core/utils.py": "M = 1\n"}, "utils: from make")
    proc = make(p, "clean")
    assert proc.returncode != 0 and "not exported" in proc.stderr
    assert p.build.is_dir()
    proc = make(p, "apply-patches")
    assert proc.returncode != 0 and "DISCARD=1" in proc.stderr
    proc = make(p, "apply-patches", "DISCARD=1")
    assert proc.returncode == 0, proc.stderr
    assert p.bgit("for-each-ref", "--format=%(objectname)", "refs/falcon-mcore/backup/") == mine
    p.bgit("cherry-pick", mine)
    series = p.root / "patches/series"
    series.write_text(series.read_text() + "# hand edit\n")  # patches/ changed since apply
    proc = make(p, "export-patches")
    assert proc.returncode != 0 and "FORCE=1" in proc.stderr
    proc = make(p, "export-patches", "FORCE=1")
    assert proc.returncode == 0, proc.stderr
    assert (p.root / "patches/0003-utils-from-make.patch").is_file()

    proc = make(p, "clean")
    assert proc.returncode == 0, proc.stderr
    assert not (p.root / "build").exists()
