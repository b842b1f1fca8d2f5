"""scripts/lib/provenance.py: commit and dirty flag from git, or from the carry record on a tree
copied without .git (the GPU machine), and "unknown" (never a guess) when neither exists."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "scripts" / "lib" / "provenance.py"


def _load():
    spec = importlib.util.spec_from_file_location("provenance_under_test", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prov = _load()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small git repository with the helper at scripts/lib/ and one results file."""
    repo = tmp_path / "repo"
    (repo / "scripts" / "lib").mkdir(parents=True)
    shutil.copy(HELPER, repo / "scripts" / "lib" / "provenance.py")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results").mkdir()
    (repo / "results" / "r.json").write_text("{}\n")
    (repo / ".gitignore").write_text("/.carry/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


def test_clean_checkout(repo):
    state = prov.code_state(repo)
    assert state["commit"] == _git(repo, "rev-parse", "HEAD")
    assert state["dirty"] is False
    assert state["provenance_source"] == "git"
    assert "provenance_warning" not in state


def test_dirty_tracked_and_untracked_but_not_results(repo):
    (repo / "results" / "r.json").write_text('{"new": 1}\n')
    (repo / "results" / "new.json").write_text("{}\n")
    assert prov.code_state(repo)["dirty"] is False  # results are not code
    (repo / "code.py").write_text("x = 2\n")
    (repo / "extra.py").write_text("y = 1\n")
    state = prov.code_state(repo)
    assert state["dirty"] is True
    assert state["dirty_paths"] == ["code.py", "extra.py"]


def _copy_without_git(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    return dest


def _write_carry(repo: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "scripts/lib/provenance.py", "--write-carry", ".carry/provenance.json"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "provenance:" in out.stdout
    return json.loads((repo / ".carry" / "provenance.json").read_text())


def test_carry_record_read_on_a_copy_without_git(repo, tmp_path):
    record = _write_carry(repo)
    assert record["commit"] == _git(repo, "rev-parse", "HEAD") and record["dirty"] is False
    copy = _copy_without_git(repo, tmp_path / "copy")
    state = prov.code_state(copy)
    assert state["commit"] == record["commit"]
    assert state["dirty"] is False
    assert state["provenance_source"].startswith(".carry/provenance.json")
    assert "provenance_warning" not in state
    # A results file written on the machine does not count as a code change.
    (copy / "results" / "r.json").write_text('{"gpu": 1}\n')
    assert prov.code_state(copy)["dirty"] is False


def test_stale_carry_marks_results_dirty(repo, tmp_path, capsys):
    _write_carry(repo)
    (repo / "code.py").write_text("x = 3\n")  # edited after prepare_carry.sh
    copy = _copy_without_git(repo, tmp_path / "copy")
    state = prov.code_state(copy)
    assert state["dirty"] is True
    assert "differ" in state["provenance_warning"]
    assert "WARNING: provenance" in capsys.readouterr().err


def test_stale_git_never_names_the_commit_of_changed_files(repo, tmp_path, capsys):
    """The GPU machine's copy can hold an older .git than its files: with the files changed
    after prepare_carry.sh, the old .git HEAD was reported as the measured commit."""
    old_git = tmp_path / "old.git"
    shutil.copytree(repo / ".git", old_git)
    (repo / "code.py").write_text("x = 5\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "newer")
    record = _write_carry(repo)
    copy = _copy_without_git(repo, tmp_path / "copy")
    shutil.copytree(old_git, copy / ".git")
    (copy / "code.py").write_text("x = 6\n")  # changed on the machine, after the record
    state = prov.code_state(copy)
    assert state["commit"] == record["commit"] != _git(copy, "rev-parse", "HEAD")
    assert state["dirty"] is True and "differ" in state["provenance_warning"]
    assert "WARNING: provenance" in capsys.readouterr().err


def test_dirty_tree_recorded_in_carry(repo, tmp_path):
    (repo / "code.py").write_text("x = 4\n")
    record = _write_carry(repo)
    assert record["dirty"] is True and record["dirty_paths"] == ["code.py"]
    state = prov.code_state(_copy_without_git(repo, tmp_path / "copy"))
    assert state["dirty"] is True and "provenance_warning" not in state


def test_unknown_is_loud_and_never_a_guess(repo, tmp_path, capsys):
    copy = _copy_without_git(repo, tmp_path / "copy")  # no carry record either
    state = prov.code_state(copy)
    assert state["commit"] == "unknown" and state["dirty"] == "unknown"
    assert "prepare_carry.sh" in state["provenance_warning"]
    assert "provenance UNKNOWN" in capsys.readouterr().err
    (copy / ".carry").mkdir()
    (copy / ".carry" / "provenance.json").write_text("{not json")
    assert prov.code_state(copy)["commit"] == "unknown"


def test_provenance_keys():
    data = prov.provenance(["scripts/x.py", "--out", "a b.json"])
    for key in ("commit", "dirty", "describe", "date_utc", "device", "python", "versions"):
        assert key in data, key
    assert data["command"].endswith("scripts/x.py --out 'a b.json'")
    assert data["versions"]["torch"]
    for name in ("triton", "transformers", "mamba_ssm", "causal_conv1d", "transformer_engine"):
        assert name in data["versions"], name
