"""`check-base` on the project's real series against the second upstream base (UPSTREAM_MAIN):
the committed patches, their resolutions in patches/bases/<short>/ and the overlay apply on a
recent upstream main commit. (The pin is checked by test_patchset_real_pin.py; the tests run on
the pin only.)

Reads the real upstream cache read-only through a private cache that borrows its objects, and a
copy of what is committed, as test_patchset_real_pin.py does. Skipped where the cache lacks the
pin (no upstream on this machine at all); a cache that has the pin but not the second base fails:
`make upstream` fetches both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from patchset_testlib import tool_env
from real_upstream import committed_copy, committed_sha, has_commit, pinned_cache, private_cache

PATHS = ["patches", "megatron_overlay", "UPSTREAM", "UPSTREAM_MAIN", "scripts"]


@pytest.fixture
def committed(tmp_path):
    """(project copy, private cache, env, main sha)."""
    _, cache = pinned_cache()
    main = committed_sha("UPSTREAM_MAIN")
    assert main, "UPSTREAM_MAIN is not committed or has no 'sha = <40 hex>' line"
    assert has_commit(cache, main), (
        f"the upstream cache {cache} has the pin but not the second base {main} (UPSTREAM_MAIN): "
        "run `make upstream` (MEGATRON_LM_GIT=<a Megatron-LM clone that has it> where GitHub "
        "cannot be reached)"
    )
    root = committed_copy(tmp_path, PATHS)
    private = private_cache(tmp_path, cache)
    return root, tool_env(tmp_path / "home", private), main


def check_base(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "patchset.py"), "--root", str(root), "check-base"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_real_series_applies_on_second_base(committed):
    root, env, main = committed
    proc = check_base(root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"[check-base] OK: {len(series(root))} patches on {main[:12]}" in proc.stdout
    assert not (root / "build").exists()


def test_real_check_fails_on_stale_or_missing_resolution(committed):
    """The check can fail: a patch edited after its resolution was made (stale), and a
    conflicting patch whose resolution is missing, are each named."""
    root, env, main = committed
    resolutions = sorted((root / "patches" / "bases" / main[:12]).glob("*.patch"))
    assert len(resolutions) >= 2, "expected resolutions for the second base"
    stale, missing = resolutions[0], resolutions[1]
    original = root / "patches" / stale.name
    original.write_text(original.read_text().replace("\n\n", "\n\nEdited later.\n", 1))
    missing.unlink()
    proc = check_base(root, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    rel = stale.relative_to(root).as_posix()
    assert f"{rel} is stale" in proc.stderr, proc.stderr
    assert f"patches/{missing.name} conflicts on upstream {main[:12]}" in proc.stderr
    assert "no resolution in" in proc.stderr and "make rebase-upstream" in proc.stderr


def series(root: Path) -> list[str]:
    return [ln for ln in (root / "patches" / "series").read_text().split() if ln]
