#!/usr/bin/env python3
"""Provenance of a results file: which code (git commit, dirty tree), where and how it ran.

Every script that writes results JSON calls :func:`provenance` and stores its keys at the top
level of the report::

    sys.path.insert(0, str(ROOT / "scripts" / "lib"))
    from provenance import provenance
    report = {**provenance(sys.argv), ...}

Keys: ``commit`` (full SHA), ``dirty`` (bool: tracked changes or untracked, not ignored files
outside ``results/``), ``describe`` (``git describe``), ``dirty_paths`` (a few of them),
``provenance_source`` (where commit/dirty came from), ``date_utc``, ``device``, ``python``,
``versions`` (torch, CUDA, triton, transformers, mamba_ssm, causal_conv1d, Transformer
Engine), ``command``.

The GPU machine receives a copy of the working tree without ``.git``. So
``scripts/gpu/prepare_carry.sh`` runs ``provenance.py --write-carry .carry/provenance.json``
here, before the copy: the commit, the dirty flag, ``git describe`` and a fingerprint of the
files the copy contains. On a tree without ``.git`` the helper reads that file and recomputes
the fingerprint; if the files changed since (the carry is stale) it says so and marks the tree
dirty. Without either source commit and dirty are the string ``"unknown"`` and a warning goes to
stderr: nothing is guessed. ``tests/test_results_provenance.py`` rejects committed results
whose commit is unknown or not in this repository's history.

Files under ``results/`` are not code: they are left out of the dirty flag and the fingerprint
(copying fresh results into ``results/`` does not make the next run "dirty").

CLI: ``provenance.py [--out FILE] [-- COMMAND...]`` prints (or writes) the provenance JSON;
``provenance.py --write-carry FILE`` writes the carry record (needs ``.git``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY_FILE = Path(".carry") / "provenance.json"
UNKNOWN = "unknown"
# Paths (relative to the repo root) that hold results, not code.
NOT_CODE = ("results/",)
MAX_DIRTY_PATHS = 20
# module name: distribution names to ask importlib.metadata when the module is not imported
VERSION_MODULES = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "mamba_ssm": ("mamba_ssm", "mamba-ssm"),
    "causal_conv1d": ("causal_conv1d", "causal-conv1d"),
    "transformer_engine": ("transformer_engine", "transformer-engine"),
    "torchao": ("torchao",),
}


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def _is_code(root: Path, path: str) -> bool:
    """Results and links to directories (a ``.venv`` link: environment) are not code."""
    if path.startswith(NOT_CODE):
        return False
    full = root / path
    return not (full.is_symlink() and full.is_dir())


def _git_state(root: Path) -> dict:
    """Commit, dirty flag, describe and the code files (tracked + untracked, not ignored)."""
    commit = _git(root, "rev-parse", "HEAD").strip()
    describe = _git(root, "describe", "--always", "--tags", "--dirty").strip()
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    dirty_paths = []
    entries = status.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":  # renames/copies are followed by the source path
            i += 1
        if _is_code(root, path):
            dirty_paths.append(path)
    files = [
        p
        for p in _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split(
            "\0"
        )
        if p and _is_code(root, p) and os.path.lexists(root / p)
    ]
    return {
        "commit": commit,
        "dirty": bool(dirty_paths),
        "describe": describe,
        "dirty_paths": sorted(dirty_paths)[:MAX_DIRTY_PATHS],
        "files": sorted(set(files)),
    }


def tree_fingerprint(root: Path, files: list[str]) -> str | None:
    """sha256 over (path, content hash) of ``files``; None if one of them is missing."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        if path.is_symlink():
            content = os.readlink(path).encode()
        elif path.is_file():
            content = path.read_bytes()
        elif path.exists():  # a directory (e.g. a submodule): not comparable
            content = b"<dir>"
        else:
            return None
        digest.update(rel.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def carry_record(root: Path = ROOT) -> dict:
    """What prepare_carry.sh stores in ``.carry/provenance.json`` (needs ``.git``)."""
    state = _git_state(root)
    return {
        "commit": state["commit"],
        "dirty": state["dirty"],
        "describe": state["describe"],
        "dirty_paths": state["dirty_paths"],
        "recorded_utc": _now(),
        "files": state["files"],
        "fingerprint": tree_fingerprint(root, state["files"]),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _carried_matches(root: Path) -> bool:
    """True if ``.carry/provenance.json`` exists and the files here are the ones it records."""
    try:
        record = json.loads((root / CARRY_FILE).read_text())
        return tree_fingerprint(root, record["files"]) == record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _git_is_stale(root: Path) -> bool:
    """True if a carry record names a commit this ``.git`` does not hold: the ``.git`` is an
    older copy than the files (the GPU machine keeps one between calls), so it cannot say
    which commit the files came from."""
    try:
        commit = json.loads((root / CARRY_FILE).read_text())["commit"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    probe = subprocess.run(
        ["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"],
        capture_output=True,
    )
    return probe.returncode != 0


def code_state(root: Path = ROOT) -> dict:
    """commit / dirty / describe / dirty_paths / provenance_source (+ warning if any).

    A carry record wins over ``.git`` when its files match this tree, or when the ``.git`` does
    not hold the recorded commit (the GPU machine's copy may hold an older ``.git`` than the
    files); a tree changed since the record was written is then marked dirty."""
    if (root / ".git").exists() and not _carried_matches(root) and not _git_is_stale(root):
        try:
            state = _git_state(root)
        except (OSError, subprocess.CalledProcessError) as exc:
            return _unknown(f"{root}/.git exists but git failed: {exc}")
        state.pop("files")
        return {**state, "provenance_source": "git"}
    carry = root / CARRY_FILE
    if not carry.is_file():
        return _unknown(
            f"{root} has no .git and no {CARRY_FILE}: run scripts/gpu/prepare_carry.sh in the "
            "checkout before copying the tree"
        )
    try:
        record = json.loads(carry.read_text())
        out = {
            "commit": record["commit"],
            "dirty": record["dirty"],
            "describe": record["describe"],
            "dirty_paths": record.get("dirty_paths", []),
            "provenance_source": f"{CARRY_FILE} (recorded {record.get('recorded_utc')})",
        }
        files, expected = record["files"], record["fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        return _unknown(f"{carry} is unreadable ({type(exc).__name__}: {exc})")
    if tree_fingerprint(root, files) != expected:
        out["dirty"] = True
        out["provenance_warning"] = (
            f"the files here differ from those {CARRY_FILE} was recorded for (code changed "
            "after scripts/gpu/prepare_carry.sh ran): the results are marked dirty"
        )
        print(f"WARNING: provenance: {out['provenance_warning']}", file=sys.stderr)
    return out


def _unknown(reason: str) -> dict:
    print(f"WARNING: provenance UNKNOWN: {reason}", file=sys.stderr)
    return {
        "commit": UNKNOWN,
        "dirty": UNKNOWN,
        "describe": UNKNOWN,
        "dirty_paths": [],
        "provenance_source": UNKNOWN,
        "provenance_warning": reason,
    }


def versions() -> dict:
    """Versions of the packages results depend on; None where a package is not installed.

    A module that is already imported reports its ``__version__`` (what actually ran); others
    are looked up in the installed distributions' metadata without importing them (importing
    Transformer Engine or mamba_ssm has side effects).
    """
    import torch  # every results script uses it

    out = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for module, dists in VERSION_MODULES.items():
        if module in sys.modules:
            out[module] = str(getattr(sys.modules[module], "__version__", UNKNOWN))
            continue
        out[module] = None
        for dist in dists:
            try:
                out[module] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if out[module] is None and importlib.util.find_spec(module) is not None:
            out[module] = f"{UNKNOWN} (importable, no distribution metadata)"
    return out


def device_name() -> str:
    """Name of CUDA device 0, or ``cpu``."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        return f"{UNKNOWN} ({type(exc).__name__})"
    return "cpu"


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance(command: list[str] | None = None, root: Path = ROOT) -> dict:
    """Provenance keys for a results report (see the module docstring)."""
    cmd = list(sys.argv if command is None else command)
    return {
        **code_state(root),
        "date_utc": _now(),
        "device": device_name(),
        "gpu": _gpu_driver(),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": versions(),
        "command": shlex.join([Path(sys.executable).name, *cmd])
        if cmd and cmd[0].endswith(".py")
        else shlex.join(cmd),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument(
        "--write-carry", metavar="FILE", help="write the carry record (commit, dirty, fingerprint)"
    )
    parser.add_argument("command", nargs="*", help="the command the results come from")
    args = parser.parse_args(argv)
    if args.write_carry:
        if not (ROOT / ".git").exists():
            sys.exit(f"error: --write-carry needs a git checkout; {ROOT} has no .git")
        data = carry_record(ROOT)
        text = json.dumps(data, indent=1) + "\n"
        out = Path(args.write_carry)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        state = "dirty" if data["dirty"] else "clean"
        print(f"provenance: {data['commit'][:12]} ({data['describe']}, {state}) -> {out}")
        return 0
    text = json.dumps(provenance(args.command), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
