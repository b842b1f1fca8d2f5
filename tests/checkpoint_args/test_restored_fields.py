"""Every option the series adds is restored by ``--use-checkpoint-args``, or listed below as
deliberately not restored.

The added options are found by comparison with the pinned upstream tree (``UPSTREAM``), not by
a list the series keeps: Megatron's ``parse_args`` and the ``TransformerConfig`` dataclass of
upstream (in a subprocess, from ``git archive`` of the pin) against the patched tree's. So a new
field or flag that a later change forgets to restore fails here, instead of silently building
a different model when a checkpoint is resumed or evaluated without the model flags (as
``--use-bitnet`` once did: the model came back full precision).

Restoring is checked by behaviour: ``load_args_from_checkpoint`` on checkpoint args whose every
added option holds a unique marker object, which the run's args must hold afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, megatron_path

pytestmark = pytest.mark.megatron

# Added arguments that --use-checkpoint-args deliberately does NOT restore. Each needs a reason.
NOT_RESTORED = {
    # Where this run executes (cpu feature), not what the model is: a checkpoint trained on GPUs
    # resumes or is evaluated on CPU, and the other way round.
    "device",
    # Which kernels compute the same BitNet model (bitnet feature): chosen for the machine a run
    # uses, like --device. A checkpoint trained with --bitnet-backend triton on GPUs must load
    # on a CPU, where only the torch reference runs; the GEMM choices and the weight cache
    # change speed and memory, not the model (its weights, T and beta are the same).
    "bitnet_backend",
    "bitnet_dgrad",
    "bitnet_wgrad",
    "bitnet_weight_cache",
    # A memory layout of the Mamba mixer's training step (mamba-batch-first feature): the same
    # model either way, and whether it can be used depends on the resuming run's parallelism
    # (it refuses sequence and context parallelism), like upstream's --sequence-parallel.
    "mamba_batch_first",
    # Whether the Mamba mixer's backward recomputes its activations or keeps them
    # (mamba-keep-activations feature): same model and same bits, a memory / speed choice for
    # the machine a run uses.
    "mamba_keep_ssd_activations",
    # Which implementation steps Adam (torch-fused-adam feature): the same AdamW update, chosen
    # for the machine like --device, not a property of the model. (Switching implementations
    # between a save and a resume is not covered by a test yet.)
    "use_torch_fused_adam",
}

# Added TransformerConfig fields that are deliberately not command-line arguments (so they
# cannot be restored from checkpoint args). Each needs a reason. None so far.
CONFIG_FIELDS_WITHOUT_ARGUMENT: set = set()

_DUMP = """
import dataclasses, json, sys
sys.argv = ["pretrain_mamba.py"]
from megatron.training.arguments import parse_args
from megatron.core.transformer.transformer_config import TransformerConfig
args = parse_args(ignore_unknown_args=True)
print("NAMES " + json.dumps({
    "args": sorted(vars(args)),
    "fields": sorted(f.name for f in dataclasses.fields(TransformerConfig)),
}))
"""


def _pin() -> str:
    for line in (ROOT / "UPSTREAM").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "sha":
            return value.strip()
    raise AssertionError("UPSTREAM has no sha")


def _upstream_repo(sha: str) -> Path:
    """A git repository holding the pin: the patched tree (built on it), else the cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(
        os.environ.get("FALCON_MCORE_CACHE", Path(base) / "falcon-mcore" / "Megatron-LM.git")
    )
    for repo in (megatron_path(), cache):
        probe = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True
        )
        if probe.returncode == 0:
            return repo
    pytest.fail(f"upstream commit {sha} is in neither {megatron_path()} nor {cache}: make upstream")


def _names(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "-c", _DUMP], capture_output=True, text=True, env=env, cwd=tree,
        timeout=600,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("NAMES ")]
    assert run.returncode == 0 and lines, (run.stdout + run.stderr)[-3000:]
    return json.loads(lines[-1][len("NAMES ") :])


@pytest.fixture(scope="module")
def added(tmp_path_factory) -> dict:
    """``{"args": ..., "fields": ...}``: argument / TransformerConfig names the series adds."""
    sha = _pin()
    upstream_tree = tmp_path_factory.mktemp("upstream")
    archive = upstream_tree / "megatron.tar"
    subprocess.run(
        ["git", "-C", str(_upstream_repo(sha)), "archive", "-o", str(archive), sha, "megatron"],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(upstream_tree, filter="data")
    upstream = _names(upstream_tree)
    patched = _names(megatron_path())
    # The comparison works (it sees upstream's options, and the series' own).
    assert {"num_layers", "hidden_size", "mamba_num_heads"} <= set(upstream["args"])
    assert "hidden_size" in upstream["fields"]
    removed = set(upstream["args"]) - set(patched["args"])
    assert not removed, f"the series removes upstream arguments: {sorted(removed)}"
    return {
        "args": set(patched["args"]) - set(upstream["args"]),
        "fields": set(patched["fields"]) - set(upstream["fields"]),
    }


def test_every_added_config_field_is_an_argument(added):
    assert {"use_bitnet", "embedding_multiplier"} <= added["fields"]
    missing = added["fields"] - added["args"] - CONFIG_FIELDS_WITHOUT_ARGUMENT
    assert not missing, (
        f"TransformerConfig fields {sorted(missing)} are no command-line argument, so "
        "--use-checkpoint-args cannot restore them: make them arguments or list them, with a "
        "reason, in CONFIG_FIELDS_WITHOUT_ARGUMENT"
    )
    stale = CONFIG_FIELDS_WITHOUT_ARGUMENT - added["fields"]
    assert not stale, f"CONFIG_FIELDS_WITHOUT_ARGUMENT lists fields the series lacks: {stale}"


class _Marker:
    """A unique checkpoint value: restored means the run's args hold this very object."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<checkpoint value of {self.name}>"


def test_every_added_argument_is_restored_or_deliberately_not(added, megatron_tree, monkeypatch):
    from megatron.training import checkpointing
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_mamba.py"])
    args = parse_args(ignore_unknown_args=True)
    args.load = "/checkpoint/that/is/not/read"
    saved = argparse.Namespace(**vars(args))
    markers = {name: _Marker(name) for name in sorted(added["args"])}
    for name, marker in markers.items():
        setattr(saved, name, marker)
    state = {"args": saved, "iteration": 7, "checkpoint_version": 3.0}
    monkeypatch.setattr(
        checkpointing, "_load_base_checkpoint", lambda *a, **k: (state, "checkpoint", False, None)
    )
    checkpointing.load_args_from_checkpoint(args)

    restored = {name for name, marker in markers.items() if getattr(args, name) is marker}
    forgotten = added["args"] - restored - NOT_RESTORED
    assert not forgotten, (
        f"--use-checkpoint-args does not restore {sorted(forgotten)}: add them to the restore "
        "lists (forward_multipliers.MODEL_ARG_NAMES, bitnet_spec.BITNET_MODEL_ARG_NAMES, ...) "
        "or to NOT_RESTORED here, with the reason"
    )
    assert not (restored & NOT_RESTORED), f"NOT_RESTORED, yet restored: {restored & NOT_RESTORED}"
    stale = NOT_RESTORED - added["args"]
    assert not stale, f"NOT_RESTORED lists arguments the series does not add: {stale}"
    assert {"use_bitnet", "bitnet_rms_norm", "bitnet_rms_norm_eps"} <= restored
