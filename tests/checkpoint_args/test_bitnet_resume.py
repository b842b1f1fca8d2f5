"""A BitNet checkpoint resumed with ``--use-checkpoint-args`` and no BitNet flags is BitNet.

``pretrain_mamba.py`` trains a tiny Falcon-H1 (``PP``: attention, Mamba and MLP projections are
BitNet linears) with ``--use-bitnet --bitnet-rms-norm --bitnet-rms-norm-eps 1e-3`` for 3
iterations, saving after iteration 2. A second run resumes iteration 2 with
``--use-checkpoint-args`` and only execution flags (device, data, optimizer schedule): its
iteration 3 must reproduce the first run's bit for bit, which it can only do with BitNet
linears, their input norms and the recorded norm epsilon. (Without the restore, the torch_dist
checkpoint still loads -- its input-norm weights are silently left unused -- into a
full-precision model; that, and the default epsilon alone, each give another loss: checked
when this test was written.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

MODEL_FLAGS = [
    "--hybrid-layer-pattern", "PP", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--kv-channels", "16", "--mamba-num-heads", "4", "--mamba-head-dim", "16",
    "--mamba-num-groups", "1", "--mamba-state-dim", "16", "--mamba-chunk-size", "16",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--max-position-embeddings", "64",
    "--use-bitnet", "--bitnet-rms-norm", "--bitnet-rms-norm-eps", "1e-3",
]  # fmt: skip
RUN_FLAGS = [
    "--device", "cpu", "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
    "--train-iters", "3", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
    "--seed", "1234", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--ckpt-format", "torch_dist",
]  # fmt: skip


def _pretrain(megatron_tree: Path, flags: list, port: int) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = str(megatron_tree)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
         "--master-port", str(port), str(megatron_tree / "pretrain_mamba.py"), *flags],
        capture_output=True, text=True, env=env, cwd=megatron_tree, timeout=900,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    return output


def _losses(output: str) -> dict:
    losses = {}
    for line in output.splitlines():
        it = re.search(r"iteration\s+(\d+)/\s*\d+ \|", line)
        loss = re.search(r"lm loss: ([0-9.Ee+-]+)", line)
        if it and loss:
            losses[int(it.group(1))] = float(loss.group(1))
    return losses


def test_resume_with_checkpoint_args_keeps_bitnet(tmp_path, megatron_tree):
    ckpt = tmp_path / "ckpt"
    first = _pretrain(
        megatron_tree,
        MODEL_FLAGS + RUN_FLAGS + ["--save", str(ckpt), "--save-interval", "2"],
        29641,
    )
    reference = _losses(first)
    assert sorted(reference) == [1, 2, 3], first[-3000:]
    assert (ckpt / "iter_0000002").is_dir()

    resumed_out = _pretrain(
        megatron_tree,
        RUN_FLAGS + ["--load", str(ckpt), "--use-checkpoint-args", "--ckpt-step", "2"],
        29643,
    )
    assert re.search(r"successfully loaded checkpoint from .*ckpt.* at iteration 2", resumed_out)
    resumed = _losses(resumed_out)
    assert sorted(resumed) == [3], resumed_out[-3000:]
    assert resumed[3] == reference[3], (reference, resumed)
    # The model came from the checkpoint args: BitNet with its input norms and their epsilon.
    for name, value in (
        ("use_bitnet", "True"),
        ("bitnet_rms_norm", "True"),
        ("bitnet_rms_norm_eps", "0.001"),
    ):
        assert re.search(rf"^\s*{name} \.+ {re.escape(value)}$", resumed_out, re.M), name
