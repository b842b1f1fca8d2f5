"""`check` on the project's real, committed patch set against the real pinned Megatron-LM.

Uses the real upstream cache read-only (through a temporary repository whose object store
borrows the cache's objects) and a copy of the committed patches/, megatron_overlay/, UPSTREAM
and scripts/ (with this checkout's scripts/patchset.py, the tool under test), so neither the
checkout nor the cache is modified. Skipped, with the reason,
where no cache holds the pinned commit.
"""

from __future__ import annotations

import subprocess
import sys

from patchset_testlib import tool_env
from real_upstream import committed_copy, pinned_cache, private_cache

# tests/functional_tests: the project test files that features.toml maps into PR branches.
PATHS = ["patches", "megatron_overlay", "UPSTREAM", "scripts", "tests/functional_tests"]


def test_real_pin_check(tmp_path):
    sha, cache = pinned_cache()
    root = committed_copy(tmp_path, PATHS, must_have=("UPSTREAM", "scripts/patchset.py"))
    private = private_cache(tmp_path, cache, pin=sha)

    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "patchset.py"), "--root", str(root), "check"],
        capture_output=True,
        text=True,
        env=tool_env(tmp_path / "home", private),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"zero-fuzz apply on {sha[:12]} and byte-identical round trip" in proc.stdout
    assert not (root / "build").exists()
