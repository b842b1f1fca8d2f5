#!/usr/bin/env python3
"""Create or refresh the project virtualenv (``make setup``).

* Python 3.12 is required (upstream Megatron imports ``typing.override``). The interpreter is
  ``$PYTHON312`` if set, else ``python3.12`` on PATH, else pyenv's 3.12 (``PYENV_VERSION``).
* torch: if a Python 3.12 on this machine already imports torch (a GPU box, an NGC container),
  the venv is created with ``--system-site-packages`` and reuses it; otherwise
  ``$TORCH_SPEC`` (default ``torch==2.14.1``) is installed from the package index.
* mamba_ssm's Python sources (``MAMBA_SSM_SPEC``, the version of the GPU machine's wheel, built
  from the package index's source archive without its CUDA extension) go into
  ``<venv>/mamba-ssm-src``, outside the venv's import path: only tests that run mamba_ssm's
  Triton kernels in Triton's interpreter put them on a subprocess's path (importing mamba_ssm
  here would change which Mamba code the other CPU tests run).
* Idempotent: a stamp in the venv records the inputs; a second run with the same inputs only
  checks that the interpreter still works.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "cpu.txt"
DEFAULT_TORCH = "torch==2.14.1"
MAMBA_SSM_SPEC = "mamba-ssm==2.3.2.post1"
MAMBA_SSM_DIR = "mamba-ssm-src"  # inside the venv; scripts/run_tests.py passes it to the tests


def find_python312() -> list[str]:
    """Command that runs a Python 3.12 interpreter."""
    candidates: list[tuple[list[str], dict[str, str]]] = []
    if os.environ.get("PYTHON312"):
        candidates.append(([os.environ["PYTHON312"]], {}))
    candidates.append((["python3.12"], {}))
    if shutil.which("pyenv"):
        versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True)
        for version in versions.stdout.split():
            if version.startswith("3.12"):
                candidates.append((["python3.12"], {"PYENV_VERSION": version}))
    for cmd, extra in candidates:
        if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
            continue
        env = {**os.environ, **extra}
        try:
            out = subprocess.run(
                cmd + ["-c", "import sys; print(sys.executable); print(sys.version_info[:2])"],
                capture_output=True, text=True, env=env, timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and "(3, 12)" in out.stdout:
            return [out.stdout.splitlines()[0]]
    sys.exit(
        "error: Python 3.12 not found (upstream Megatron requires it). Install it, put python3.12 "
        "on PATH, or set PYTHON312=/path/to/python3.12 (pyenv: PYENV_VERSION=3.12.1)."
    )


def system_torch(python: list[str]) -> str | None:
    """torch version importable by ``python`` outside any venv, else None."""
    out = subprocess.run(
        python + ["-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip() if out.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv")
    args = parser.parse_args()
    venv = (ROOT / args.venv).resolve()
    vpy = venv / "bin" / "python"
    torch_spec = os.environ.get("TORCH_SPEC", DEFAULT_TORCH)
    python = find_python312()
    reuse = system_torch(python)
    stamp_data = "\n".join(
        [python[0], f"reuse-torch={reuse}", torch_spec, REQUIREMENTS.read_text(), MAMBA_SSM_SPEC]
    ).encode()
    stamp_value = hashlib.sha256(stamp_data).hexdigest()
    stamp = venv / ".falcon-mcore-setup"
    if stamp.is_file() and stamp.read_text().strip() == stamp_value and vpy.exists():
        ok = subprocess.run([str(vpy), "-c", "import torch, pytest"], capture_output=True)
        if ok.returncode == 0:
            print(f"[setup] {args.venv} is up to date")
            return 0
    if not vpy.exists():
        cmd = python + ["-m", "venv"]
        if reuse:
            cmd.append("--system-site-packages")
        print(f"[setup] creating {venv} with {python[0]}" + (f" (reusing torch {reuse})" if reuse else ""))
        subprocess.run(cmd + [str(venv)], check=True)
    pip = [str(vpy), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    have_torch = subprocess.run([str(vpy), "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        print(f"[setup] installing {torch_spec} (about a minute)")
        subprocess.run(pip + [torch_spec], check=True)
    print(f"[setup] installing {REQUIREMENTS.relative_to(ROOT)}")
    subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
    mamba_dir = venv / MAMBA_SSM_DIR
    print(f"[setup] installing {MAMBA_SSM_SPEC} (Python sources only) into {mamba_dir}")
    shutil.rmtree(mamba_dir, ignore_errors=True)
    subprocess.run(
        pip + ["--no-deps", "--no-build-isolation", "--target", str(mamba_dir), MAMBA_SSM_SPEC],
        check=True,
        env={**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"},
    )
    stamp.write_text(stamp_value + "\n")
    version = subprocess.run(
        [str(vpy), "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    print(f"[setup] ready: Python/torch {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
