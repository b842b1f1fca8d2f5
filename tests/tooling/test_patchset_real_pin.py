"""`check` on the project's real, committed patch set against the real pinned Megatron-LM.

Uses the real upstream cache read-only (through a temporary repository whose object store
borrows the cache's objects) and a copy of the committed patches/, megatron_overlay/, UPSTREAM
and scripts/ (with this checkout's scripts/patchset.py, the tool under test), so neither the
checkout nor the cache is modified. Skipped, with the reason,
where no cache holds the pinned commit.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from patchset_testlib import REPO_ROOT, SCRIPT, SCRIPT_MODULES, tool_env

# tests/functional_tests: the project test files that features.toml maps into PR branches.
PATHS = ["patches", "megatron_overlay", "UPSTREAM", "scripts", "tests/functional_tests"]


def real_cache() -> Path:
    """Where the tool itself would find the upstream cache on this machine."""
    for var in ("FALCON_MCORE_CACHE_REAL", "FALCON_MCORE_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "falcon-mcore" / "Megatron-LM.git"


def committed_pin_sha() -> str | None:
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", "HEAD:UPSTREAM"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    match = re.search(r"^sha\s*=\s*([0-9a-f]{40})\s*$", proc.stdout, re.M)
    return match.group(1) if match else None


def test_real_pin_check(tmp_path):
    sha = committed_pin_sha()
    if sha is None:
        pytest.skip(f"{REPO_ROOT} is not a git checkout with a committed UPSTREAM file")
    cache = real_cache()
    has = subprocess.run(
        ["git", "-C", str(cache), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True
    )
    if not cache.is_dir() or has.returncode != 0:
        pytest.skip(
            f"the upstream cache {cache} does not hold the pinned commit {sha} "
            "(run `make upstream`, or set FALCON_MCORE_CACHE_REAL to a cache that has it)"
        )

    # A copy of what is committed (not the working tree: others may be editing it).
    listed = (
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO_ROOT),
                "ls-tree",
                "-r",
                "-z",
                "--name-only",
                "HEAD",
                "--",
                *PATHS,
            ],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    listed = [p for p in listed if p]
    assert "UPSTREAM" in listed and "scripts/patchset.py" in listed
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "HEAD", "--", *listed],
        capture_output=True,
        check=True,
    ).stdout
    root = tmp_path / "project"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="tar")
    # The tool under test is this checkout's patchset.py, as in every other tooling test.
    shutil.copy2(SCRIPT, root / "scripts" / "patchset.py")
    for module in SCRIPT_MODULES:
        shutil.copy2(module, root / "scripts" / module.name)

    # A private cache that reads the real one's objects and never writes to it.
    private = tmp_path / "cache"
    subprocess.run(["git", "init", "-q", "--bare", str(private)], check=True)
    objects = cache / "objects"
    (private / "objects" / "info" / "alternates").write_text(f"{objects.resolve()}\n")
    subprocess.run(
        ["git", "-C", str(private), "update-ref", f"refs/falcon-mcore/pins/{sha}", sha],
        check=True,
    )

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
