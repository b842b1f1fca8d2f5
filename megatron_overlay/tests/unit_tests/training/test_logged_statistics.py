# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""A training step reads nothing off the device between log iterations
(``megatron/training/logged_statistics.py``), and what it logs is what upstream's reductions
returned.

* The one-rank helpers give upstream's values: numbers rounded to float32, ``None`` for
  upstream's -1 marker, only the object ``True`` as true; tensors stay on the device until read.
* With more model-parallel ranks the helpers are upstream's reductions.
* ``pretrain_hybrid.py`` trains a tiny Falcon-H1 model on the CPU with the step settings of a
  CUDA-graph run, in fp32, bf16 and bf16 with the distributed optimizer (``host_reads_worker.py``
  counts the reads): the iterations that log read values on the host, the others read none.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from megatron.training import logged_statistics
from megatron.training.logged_statistics import (
    model_parallel_and,
    model_parallel_max,
    read_logged_statistics,
)
from megatron.training.utils.common_utils import (
    logical_and_across_model_parallel_group,
    reduce_max_stat_across_model_parallel_group,
)
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.gloo_single_rank import requires_cpu_training

ROOT = Path(__file__).resolve().parents[3]


def _replaced(flags, values):
    """``flags`` with the value after each flag in ``values`` replaced."""
    out = list(flags)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("stat", [None, 0.1, 3e-4, 1.0, -1.0, 1e40, 7])
def test_one_rank_max_of_a_number_is_upstreams(single_rank, stat):
    ours = model_parallel_max(stat)
    assert ours == reduce_max_stat_across_model_parallel_group(stat)
    assert ours is None or isinstance(ours, float)
    if stat == 0.1:
        assert ours == float(numpy.float32(0.1)) != 0.1  # rounded as the reduction rounds


@pytest.mark.parametrize("value", [0.3, 2.5e-5, 7.0])
def test_one_rank_max_of_a_tensor_stays_on_the_device_until_read(single_rank, value):
    for stat in (torch.tensor([value]), torch.tensor(value, dtype=torch.float64)):
        kept = model_parallel_max(stat)
        assert kept is stat
        (read,) = read_logged_statistics(kept)
        assert read == reduce_max_stat_across_model_parallel_group(stat)


@pytest.mark.parametrize("flag", [True, False, torch.tensor(True), 1])
def test_one_rank_and_is_upstreams(single_rank, flag):
    assert model_parallel_and(flag) is logical_and_across_model_parallel_group(flag)


def test_read_logged_statistics_leaves_numbers_and_none():
    assert read_logged_statistics(None, 2.5, torch.tensor([4.0])) == (None, 2.5, 4.0)


def test_more_ranks_use_upstreams_reductions(monkeypatch):
    calls = []
    monkeypatch.setattr(logged_statistics, "_group_size", lambda group: 2)
    monkeypatch.setattr(
        logged_statistics,
        "reduce_max_stat_across_model_parallel_group",
        lambda stat, group=None: calls.append(("max", stat, group)) or 9.0,
    )
    monkeypatch.setattr(
        logged_statistics,
        "logical_and_across_model_parallel_group",
        lambda flag, group=None: calls.append(("and", flag, group)) or False,
    )
    stat = torch.tensor([1.0])
    assert model_parallel_max(stat, group="mp") == 9.0
    assert model_parallel_and(True, group="mp") is False
    assert calls == [("max", stat, "mp"), ("and", True, "mp")]


# A tiny Falcon-H1 model (two 'P' layers with multipliers) with the step settings of a run with
# CUDA graphs (rerun state machine off, no NaN check, PyTorch's fused AdamW); a log line every
# 4th iteration.
TRAIN_FLAGS = [
    "--device", "cpu", "--transformer-impl", "local", "--distributed-backend", "gloo",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--train-iters", "8", "--log-interval", "4", "--eval-iters", "0", "--eval-interval", "1000",
    "--lr", "0.01", "--min-lr", "0.001", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
    "--use-torch-fused-adam", "--rerun-mode", "disabled", "--no-check-for-nan-in-loss-and-grad",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
    "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--hybrid-layer-pattern", "PP",
    "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "8",
    "--mamba-num-heads", "4", "--mamba-head-dim", "8", "--mamba-num-groups", "1",
    "--mamba-state-dim", "8", "--mamba-chunk-size", "8",
    "--embedding-multiplier", "5.65", "--lm-head-multiplier", "0.039",
    "--key-multiplier", "0.39", "--ssm-out-multiplier", "0.24",
    "--mlp-multipliers", "0.88", "0.59", "--ssm-multipliers", "0.35", "0.25", "0.35", "0.5", "0.35",
]  # fmt: skip
LOG_ITERATIONS = {0, 3, 7}  # train_step's 0-based iteration: the first, then every 4th


def _reads_per_iteration(tmp_path, flags, iterations, cuda=False):
    """Train with ``flags`` in host_reads_worker.py; {0-based iteration: {where: reads}}."""
    out = tmp_path / "reads.json"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.unit_tests.training.host_reads_worker",
            *(["--cuda"] if cuda else []), str(out), "--", *flags,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"iteration {iterations:>8}/{iterations:>8}" in proc.stdout, proc.stdout[-3000:]
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


@requires_cpu_training
@pytest.mark.parametrize(
    "precision", [[], ["--bf16"], ["--bf16", "--use-distributed-optimizer"]], ids=str
)
def test_only_logging_iterations_read_the_device(tmp_path, precision):
    reads = _reads_per_iteration(tmp_path, TRAIN_FLAGS + precision, 8)
    for iteration in range(8):
        found = reads.get(iteration, {})
        if iteration in LOG_ITERATIONS:
            # The counter sees a logging iteration's reads (the logged loss, gradient norm and
            # loss scale): it would see the same reads on any other iteration.
            assert sum(found.values()) >= 3, (iteration, found)
            assert any("training_log" in frame for frame in found), found
            assert any(frame.startswith("logged_statistics.py") for frame in found), found
        else:
            assert not found, f"iteration {iteration} read the device at {found}"
    assert set(reads) <= LOG_ITERATIONS | set(range(8))


# On a GPU: the same model at sizes the mamba_ssm kernels take, bf16, whole-iteration and
# optimizer CUDA graphs (captured after 3 warm-up steps), 16 iterations.
GPU_FLAGS = [
    flag for flag in TRAIN_FLAGS if flag not in ("--device", "cpu", "--distributed-backend", "gloo")
]
GPU_FLAGS = _replaced(
    GPU_FLAGS,
    {
        "--train-iters": "16", "--seq-length": "64", "--max-position-embeddings": "64",
        "--hidden-size": "64", "--ffn-hidden-size": "128", "--kv-channels": "16",
        "--mamba-num-heads": "8", "--mamba-head-dim": "16", "--mamba-state-dim": "16",
        "--mamba-chunk-size": "16",
    },
) + [
    "--bf16", "--cuda-graph-impl", "full_iteration", "--optimizer-cuda-graph",
    "--cuda-graph-warmup-steps", "3", "--no-gradient-accumulation-fusion",
    "--no-create-attention-mask-in-dataloader",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_steps_synchronise_only_to_log(tmp_path):
    """torch.cuda.set_sync_debug_mode counts every synchronising operation: after the graphs
    are captured (iteration 4 on), only the iterations that log have any."""
    reads = _reads_per_iteration(tmp_path, GPU_FLAGS, 16, cuda=True)
    for iteration in range(5, 16):
        found = reads.get(iteration, {})
        if (iteration + 1) % 4 == 0:
            assert sum(found.values()) >= 1, (iteration, reads)
        else:
            assert not found, f"iteration {iteration} synchronised at {found}"
