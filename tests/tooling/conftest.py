"""Fixtures for the patch-set tooling tests (``scripts/patchset.py``).

Every test gets its own throwaway world under ``tmp_path``:

* ``upstream/``  a tiny git repository that plays the role of upstream Megatron-LM (a copy of
  a session-wide template, so a test may add commits to it or delete it);
* ``project/``   a throwaway falcon-mcore checkout: ``scripts/patchset.py`` (copied from this
  repository), ``UPSTREAM`` (url = the tiny repository), ``patches/`` with two format-patch
  files in two features, ``megatron_overlay/`` with a few new files;
* ``cache/``     the bare upstream cache (``FALCON_MCORE_CACHE``), pre-filled unless a test
  asks for an empty one, so the real cache in ``~/.cache`` is never read or written;
* ``home/``      ``HOME`` of the tool, so no user git configuration leaks in.

The tool always runs as a subprocess, exactly as the Makefile runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchset_testlib import Proj, Templates, build_templates  # noqa: E402


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    """The toy upstream repo, toy project and filled cache, built once per session."""
    return build_templates(tmp_path_factory.mktemp("templates"))


@pytest.fixture
def proj(tmp_path: Path, templates: Templates) -> Proj:
    """A fresh throwaway project whose cache already holds the toy pin."""
    return Proj(tmp_path, templates)


@pytest.fixture
def bare_proj(tmp_path: Path, templates: Templates) -> Proj:
    """A fresh throwaway project with an empty cache."""
    return Proj(tmp_path, templates, empty_cache=True)
