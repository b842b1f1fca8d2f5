"""Provenance of a results file: the code (git commit, dirty tree), device, versions, command.

On a machine that received a copy of the working tree without ``.git`` (the GPU machine), the
commit comes from ``.carry/provenance.json``, written here by ``scripts/gpu/prepare_carry.sh``
before the copy; without either source the commit is recorded as ``"unknown"``, never guessed.
"""

from __future__ import annotations

import datetime
import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRIED = ROOT / ".carry" / "provenance.json"
PACKAGES = ("torch", "triton", "transformers", "mamba_ssm", "causal_conv1d", "transformer_engine")


def git_state(root: Path = ROOT) -> dict:
    """``{commit, dirty, describe}`` of the checkout at ``root`` (raises if it is no git repo)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status),
        "describe": git("describe", "--always", "--dirty"),
    }


def code_state() -> dict:
    """Git state of this checkout, else the carried one, else ``commit: unknown``."""
    try:
        return git_state()
    except (OSError, subprocess.CalledProcessError):
        pass
    if CARRIED.is_file():
        return json.loads(CARRIED.read_text())
    return {"commit": "unknown", "dirty": None, "describe": "no .git and no .carry/provenance.json"}


def versions() -> dict:
    """Python and package versions (``unavailable (...)`` for packages that do not import)."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def device() -> str:
    """Name of GPU 0, or ``cpu``."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def provenance(command: list[str]) -> dict:
    """The fields every results file carries."""
    return {
        **code_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "command": " ".join(command),
    }


if __name__ == "__main__":
    # `python3 scripts/lib/provenance.py`: the git state of this checkout as JSON (for .carry/).
    print(json.dumps(git_state(), indent=1))
