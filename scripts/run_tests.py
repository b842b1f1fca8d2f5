#!/usr/bin/env python3
"""Run every CPU test of falcon-mcore (``make test``); extra arguments go to pytest.

1. Project tests (``tests/``): patch-set tooling, overlay module unit tests, HF parity,
   converters and functional cases. They import Megatron from ``build/Megatron-LM``.
2. Upstream-style unit tests inside the patched tree: the overlay's own tests and the upstream
   test files the series modifies (listed in ``ci/upstream_unit_tests.txt``), run with the
   tree's conftest like upstream CI would (on the CPU tier with ``TRITON_INTERPRET=1``, so
   that the BitNet Triton kernels are tested in Triton's CPU interpreter).

GPU-only tests are marked ``gpu`` and deselected here (they run on the device machine through
``scripts/gpu/run_gpu_tests.sh``). Exit status: pytest's; "no tests collected" counts as failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "Megatron-LM"
UPSTREAM_TESTS = ROOT / "ci" / "upstream_unit_tests.txt"
MAMBA_SSM_DIR = "mamba-ssm-src"  # scripts/setup_env.py installs mamba_ssm's sources there


def upstream_test_paths() -> list[str]:
    """Test files to run inside the patched tree (paths relative to the tree)."""
    paths = []
    for line in UPSTREAM_TESTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if not (BUILD / line).exists():
                sys.exit(f"error: {UPSTREAM_TESTS.name} lists {line}, missing in {BUILD}")
            paths.append(line)
    return paths


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> int:
    print(f"\n[test] ({cwd.name}) {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, cwd=cwd, env=env)


def main(argv: list[str]) -> int:
    if not (BUILD / "megatron").is_dir():
        sys.exit(f"error: {BUILD} missing: run `make apply-patches` first")
    env = dict(os.environ)
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU tier, also on a GPU box
    env["PYTHONPATH"] = os.pathsep.join([str(BUILD), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not gpu"]
    status = run(pytest + ["-q", "tests", *argv], ROOT, env)
    paths = upstream_test_paths()
    if paths:
        tree_env = dict(env)
        if tree_env["CUDA_VISIBLE_DEVICES"] == "":
            # CPU tier: the BitNet Triton kernels run in Triton's CPU interpreter. Triton reads
            # the variable when first imported, which the tree's tests/unit_tests/conftest.py
            # does before any test module, so it is set for the whole run.
            tree_env.setdefault("TRITON_INTERPRET", "1")
        # mamba_ssm's sources for the tests that run its kernels in a subprocess (make setup).
        mamba_src = Path(sys.prefix) / MAMBA_SSM_DIR
        if not (mamba_src / "mamba_ssm").is_dir():
            sys.exit(f"error: {mamba_src} has no mamba_ssm: run `make setup`")
        tree_env.setdefault("MAMBA_SSM_PYTHONPATH", str(mamba_src))
        status = run(pytest + ["-q", *paths, *argv], BUILD, tree_env) or status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
