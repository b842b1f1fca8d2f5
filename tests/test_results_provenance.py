"""Every committed results JSON names the code it measured: a commit in this repository's history
and whether the tree was dirty (written by scripts/lib/provenance.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

# Results measured before provenance existed (they record no commit). Each is superseded when the
# GPU job is re-run from a recorded commit: delete the file and its line here then. Listed one by
# one so that a new file without provenance cannot slip in; a listed file that no longer exists
# fails test_legacy_list_is_current.
# None remain since the 2026-12-04 H200 re-runs.
LEGACY_WITHOUT_PROVENANCE: set[str] = set()
SHA = re.compile(r"[0-9a-f]{40}")


def _results_json() -> list[str]:
    return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*.json"))


def _commit_exists(sha: str) -> bool:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True
    )
    return out.returncode == 0


@pytest.fixture(scope="module")
def git_checkout():
    if not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout: results commits cannot be checked")


def test_results_exist():
    assert _results_json(), f"no JSON under {RESULTS}"


@pytest.mark.parametrize(
    "rel", [r for r in _results_json() if r not in LEGACY_WITHOUT_PROVENANCE] or ["<none>"]
)
def test_result_names_a_commit_in_history(git_checkout, rel):
    if rel == "<none>":
        pytest.skip("only legacy results are committed")
    data = json.loads((RESULTS / rel).read_text())
    assert isinstance(data, dict), f"{rel}: not a JSON object"
    commit, dirty = data.get("commit"), data.get("dirty")
    assert isinstance(commit, str) and SHA.fullmatch(commit), (
        f"{rel}: 'commit' is {commit!r}; results must come from a recorded commit "
        "(scripts/lib/provenance.py; on the GPU machine run scripts/gpu/prepare_carry.sh first)"
    )
    assert _commit_exists(commit), f"{rel}: commit {commit} is not in this repository's history"
    assert isinstance(dirty, bool), f"{rel}: 'dirty' must be true or false, got {dirty!r}"


def test_legacy_list_is_current():
    present = set(_results_json())
    gone = sorted(LEGACY_WITHOUT_PROVENANCE - present)
    assert not gone, f"remove from LEGACY_WITHOUT_PROVENANCE (files no longer exist): {gone}"
    for rel in sorted(LEGACY_WITHOUT_PROVENANCE):
        assert rel.startswith("h100-legacy/"), f"{rel}: legacy results live in h100-legacy/"
        # A file that gained provenance is no longer legacy: take it off the list.
        assert "commit" not in json.loads((RESULTS / rel).read_text()), rel


def test_check_is_not_vacuous(git_checkout, tmp_path):
    """The commit check rejects an unknown or made-up commit (guards the helper above)."""
    assert _commit_exists(subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip())
    assert not _commit_exists("0" * 40)
    assert not SHA.fullmatch("unknown")
