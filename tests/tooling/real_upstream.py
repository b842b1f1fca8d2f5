"""Shared set-up of the tooling tests that run on the real pinned Megatron-LM.

``test_patchset_real_{pin,base,pr_branch}.py`` each check the project's committed series
against the real upstream cache without touching the checkout or the cache: they read a copy of
what is committed (with this checkout's ``scripts/patchset.py`` as the tool under test) and a
private cache whose object store borrows the real one's objects.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from patchset_testlib import REPO_ROOT, SCRIPT, SCRIPT_MODULES


def real_cache() -> Path:
    """Where the tool itself would find the upstream cache on this machine."""
    for var in ("FALCON_MCORE_CACHE_REAL", "FALCON_MCORE_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "falcon-mcore" / "Megatron-LM.git"


def committed_sha(name: str) -> str | None:
    """The ``sha = ...`` of the committed pin file ``name`` (UPSTREAM, UPSTREAM_MAIN)."""
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"HEAD:{name}"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    match = re.search(r"^sha\s*=\s*([0-9a-f]{40})\s*$", proc.stdout, re.M)
    return match.group(1) if match else None


def committed_pin_sha() -> str | None:
    return committed_sha("UPSTREAM")


def has_commit(repo: Path, sha: str) -> bool:
    proc = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True
    )
    return repo.is_dir() and proc.returncode == 0


def pinned_cache() -> tuple[str, Path]:
    """(pin sha, real cache); skips the test, with the reason, where either is missing."""
    sha = committed_pin_sha()
    if sha is None:
        pytest.skip(f"{REPO_ROOT} is not a git checkout with a committed UPSTREAM file")
    cache = real_cache()
    if not has_commit(cache, sha):
        pytest.skip(
            f"the upstream cache {cache} does not hold the pinned commit {sha} "
            "(run `make upstream`, or set FALCON_MCORE_CACHE_REAL to a cache that has it)"
        )
    return sha, cache


def committed_copy(dest: Path, paths: list[str], must_have: tuple[str, ...] = ()) -> Path:
    """``paths`` as committed at HEAD (not the working tree: others may be editing it),
    extracted under ``dest / "project"``, with this checkout's tool under test."""
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-tree", "-r", "-z", "--name-only", "HEAD", "--", *paths],
        capture_output=True,
        check=True,
    ).stdout.decode()
    listed = [p for p in listed.split("\0") if p]
    for path in must_have:
        assert path in listed, f"{path} is not committed"
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "HEAD", "--", *listed],
        capture_output=True,
        check=True,
    ).stdout
    root = dest / "project"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="tar")
    shutil.copy2(SCRIPT, root / "scripts" / "patchset.py")
    for module in SCRIPT_MODULES:
        shutil.copy2(module, root / "scripts" / module.name)
    return root


def private_cache(dest: Path, cache: Path, pin: str | None = None) -> Path:
    """A bare repository under ``dest / "cache"`` that reads ``cache``'s objects and never
    writes to it; with ``pin``, the ref the tool keeps for a fetched pin."""
    private = dest / "cache"
    subprocess.run(["git", "init", "-q", "--bare", str(private)], check=True)
    (private / "objects" / "info" / "alternates").write_text(f"{(cache / 'objects').resolve()}\n")
    if pin is not None:
        subprocess.run(
            ["git", "-C", str(private), "update-ref", f"refs/falcon-mcore/pins/{pin}", pin],
            check=True,
        )
    return private
