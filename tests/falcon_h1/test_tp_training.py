"""Falcon-H1 fine-tuned at any tensor / context-parallel layout prints the one-rank losses.

One converted HF Falcon-H1 (``mamba_n_groups`` 1 as in every release up to 7B, gated RMSNorm on,
2 KV heads, all 14 multipliers distinct) is fine-tuned for 6 steps by ``pretrain_mamba.py`` on
CPU gloo ranks at TP=2 and 4 (more TP ranks than Mamba groups and KV heads), with and without
sequence parallelism, at TP=2 x PP=2, at TP=2 x DP=2 with the distributed optimizer, at CP=2 and
TP=2 x CP=2 x SP; a second checkpoint with 2 Mamba groups at TP=4. Every printed loss (7
significant digits) equals the one-rank run's (context parallelism: within one unit of the last
digit). The runs start from one checkpoint because random initialisation differs between TP
sizes. SGD with a large learning rate makes each step move the loss a lot, so a gradient that
is wrong (or wrongly scaled) on any rank changes the later losses; the distributed optimizer
needs Adam.

A torch_dist checkpoint saved during TP=1 training resumes at TP=4 (model and optimizer state
resharded, B / C rows of the one Mamba group now split over 4 ranks): its losses equal the
uninterrupted TP=1 run's; what the TP=4 run saves loads at TP=1 and, saved again, every model
and optimizer tensor read back as a global tensor equals the TP=4 run's bit for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import megatron_path
from falcon_h1.oracle import MULTIPLIERS, TinyShape, build_hf_model

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

VOCAB = 128


def _env(megatron_tree: Path) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = str(megatron_tree)
    return env


def _convert(megatron_tree: Path, tmp: Path, groups: int) -> Path:
    """A random HF Falcon-H1 with ``groups`` Mamba groups converted to one torch_dist
    checkpoint (TP=1; Megatron reshards it on load)."""
    hf = build_hf_model(
        TinyShape(layers=2, mamba_groups=groups, rms_norm=True, vocab=VOCAB), MULTIPLIERS, seed=3
    )
    hf.save_pretrained(tmp / "hf")
    ckpt = tmp / "megatron"
    convert = subprocess.run(
        [sys.executable, str(megatron_tree / "tools/checkpoint/falcon_h1_conversion.py"),
         "hf-to-megatron", "--hf-dir", str(tmp / "hf"), "--save-dir", str(ckpt),
         "--target-tp", "1", "--target-pp", "1", "--ckpt-format", "torch_dist"],
        capture_output=True, text=True, env=_env(megatron_tree), timeout=600,
    )  # fmt: skip
    assert convert.returncode == 0, (convert.stdout + convert.stderr)[-3000:]
    return ckpt


@pytest.fixture(scope="module")
def ckpt_g1(tmp_path_factory) -> Path:
    return _convert(megatron_path(), tmp_path_factory.mktemp("tp_training_g1"), groups=1)


@pytest.fixture(scope="module")
def ckpt_g2(tmp_path_factory) -> Path:
    return _convert(megatron_path(), tmp_path_factory.mktemp("tp_training_g2"), groups=2)


def _train(ckpt: Path, nproc: int, args: list, iters: int = 6, finetune: bool = True) -> dict:
    """``{iteration: printed lm loss string}`` of pretrain_mamba.py training from ``ckpt`` on
    ``nproc`` CPU ranks (``--standalone``: a free rendezvous port, no collisions)."""
    megatron_tree = megatron_path()
    load = ["--no-load-optim", "--no-load-rng", "--finetune"] if finetune else []
    train = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", str(nproc), str(megatron_tree / "pretrain_mamba.py"),
         "--load", str(ckpt), "--use-checkpoint-args", *load,
         "--device", "cpu", "--distributed-backend", "gloo", "--transformer-impl", "local",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
         "--ckpt-format", "torch_dist", "--seq-length", "32", "--max-position-embeddings", "256",
         "--micro-batch-size", "2", "--train-iters", str(iters), "--seed", "1234",
         "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
         "--attention-dropout", "0.0", "--hidden-dropout", "0.0", *args],
        capture_output=True, text=True, env=_env(megatron_tree), cwd=megatron_tree, timeout=900,
    )  # fmt: skip
    output = train.stdout + train.stderr
    assert train.returncode == 0, output[-4000:]
    losses = {}
    for line in output.splitlines():
        it = re.search(r"iteration\s+(\d+)/\s*\d+ \|", line)
        loss = re.search(r"lm loss: ([0-9.Ee+-]+)", line)
        if it and loss:
            losses[int(it.group(1))] = loss.group(1)
    return losses


_SGD = ["--optimizer", "sgd", "--lr", "1.0", "--global-batch-size", "2"]
# Adam's default epsilon (1e-8) turns float32 round-off in gradient elements near zero (other
# reduction orders at TP > 1) into full-size steps, visible in the 7th digit after a few steps;
# with 1e-4 the update stays proportional to the gradient there.
_ADAM = ["--optimizer", "adam", "--adam-eps", "1e-4", "--lr", "1e-2", "--global-batch-size", "4"]
_TP2, _TP4 = ["--tensor-model-parallel-size", "2"], ["--tensor-model-parallel-size", "4"]
_SP = ["--sequence-parallel"]


def _moved(losses: dict) -> float:
    first, last = float(losses[min(losses)]), float(losses[max(losses)])
    return abs(last - first) / first


class _References:
    """One-rank runs, computed once per (checkpoint, arguments)."""

    def __init__(self, adam_save: Path):
        self.done = {}
        self.adam_save = adam_save

    def get(self, ckpt: Path, args: list) -> dict:
        key = (str(ckpt), tuple(args))
        if key not in self.done:
            # The one-rank Adam run also saves torch_dist checkpoints (for the resume test).
            save = ["--save", str(self.adam_save), "--save-interval", "3"] if args is _ADAM else []
            losses = _train(ckpt, 1, args + save)
            assert sorted(losses) == list(range(1, 7)), losses
            assert _moved(losses) > 1e-2, (losses, "training did not move the loss")
            self.done[key] = losses
        return self.done[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> _References:
    return _References(tmp_path_factory.mktemp("tp1_adam_save"))


_CP2 = ["--context-parallel-size", "2"]
# name: (checkpoint, reference args (one rank), ranks, args). Printed losses must match to one
# unit of the last digit (MAX_LAST_DIGIT_UNITS).
CASES = {
    "tp2": ("g1", _SGD, 2, _SGD + _TP2),
    "tp4": ("g1", _SGD, 4, _SGD + _TP4),
    "tp2_sp": ("g1", _SGD, 2, _SGD + _TP2 + _SP),
    "tp4_sp": ("g1", _SGD, 4, _SGD + _TP4 + _SP),
    "tp2_pp2": ("g1", _SGD, 4, _SGD + _TP2 + ["--pipeline-model-parallel-size", "2",
                                              "--hybrid-layer-pattern", "P|P"]),  # fmt: skip
    # DP=2 with the distributed optimizer (Adam only) vs one rank accumulating 2 micro-batches.
    "tp2_dp2_distopt": ("g1", _ADAM, 4, _ADAM + _TP2 + ["--use-distributed-optimizer"]),
    "cp2": ("g1", _SGD, 2, _SGD + _CP2),
    "tp2_cp2_sp": ("g1", _SGD, 4, _SGD + _TP2 + _CP2 + _SP),
    "g2_tp4": ("g2", _SGD, 4, _SGD + _TP4),
}


# Every parallel layout sums in a different order than one rank: tensor parallelism adds the
# row-parallel linears' partial products across ranks (one rank adds them inside one GEMM),
# context parallelism sums each sequence's loss over the CP ranks' halves. The fp32 round-off
# this causes (~1e-7 relative) moves the 7th printed digit by one when a loss lies that close
# to a rounding boundary: on this CI machine step 3's 4.404087|5 printed 4.404088 at TP=2 and
# TP=4 (the same code matched exactly in an earlier CI run), so one unit is allowed, never more.
# A lost multiplier or a wrong shard moves the losses by far more (test_multipliers_matter).
MAX_LAST_DIGIT_UNITS = 1


def _last_digit_units(a: str, b: str) -> int:
    """Difference of two printed losses (``d.ddddddE+xx``) in units of the last digit."""
    (ma, ea), (mb, eb) = a.split("E"), b.split("E")
    assert ea == eb, (a, b)
    return abs(round(float(ma) * 1e6) - round(float(mb) * 1e6))


@pytest.mark.parametrize("case", list(CASES))
def test_losses_equal_one_rank(request, references, case):
    """Every printed loss of the 6 steps equals the one-rank run's to within one unit of the
    last printed digit (MAX_LAST_DIGIT_UNITS says why not exactly)."""
    ckpt_name, ref_args, ranks, args = CASES[case]
    ckpt = request.getfixturevalue(f"ckpt_{ckpt_name}")
    reference = references.get(ckpt, ref_args)
    losses = _train(ckpt, ranks, args)
    print(f"{case}: one rank {reference}\n{case}: {losses}")
    assert sorted(losses) == sorted(reference), losses
    units = {s: _last_digit_units(reference[s], losses[s]) for s in reference}
    assert max(units.values()) <= MAX_LAST_DIGIT_UNITS, (reference, losses, units)


def test_checkpoint_resumes_across_tp_sizes(ckpt_g1, references, tmp_path):
    """TP=1 -> TP=4 -> TP=1 with Megatron's own torch_dist checkpoints (model and Adam state).

    The one-rank Adam run saved at steps 3 and 6. A TP=4 run resumes from step 3 (the weights,
    including the Mamba group's B / C rows now split over 4 ranks, and the optimizer state are
    resharded): its steps 4-6 print the one-rank run's losses. A TP=1 run then loads what the
    TP=4 run saved at step 6 and saves it again without training: every model and optimizer
    tensor, read back as global tensors, is bit-identical to the TP=4 run's."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_plain_tensors

    reference = references.get(ckpt_g1, _ADAM)
    tp1_save = references.adam_save
    tp4_save, back = tmp_path / "tp4", tmp_path / "back"
    resumed = _train(
        tp1_save, 4, _ADAM + _TP4 + ["--ckpt-step", "3", "--no-load-rng", "--save",
                                     str(tp4_save), "--save-interval", "3"], finetune=False,
    )  # fmt: skip
    assert sorted(resumed) == [4, 5, 6], resumed
    # Upstream's log after a resume prints at step 5 the mean of steps 4 and 5 (also at TP=1),
    # so steps 4 and 6 are compared: step 6 follows from the weights after step 5.
    units = [_last_digit_units(reference[s], resumed[s]) for s in (4, 6)]
    assert max(units) <= MAX_LAST_DIGIT_UNITS, (reference, resumed, units)

    again = _train(
        tp4_save, 1, _ADAM + ["--no-load-rng", "--save", str(back), "--save-interval", "1000"],
        finetune=False,
    )
    assert again == {}, again
    # load_plain_tensors reads global tensors in one process; it needs a process group.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", world_size=1, rank=0)
    try:
        saved_tp4 = load_plain_tensors(str(tp4_save / "iter_0000006"))
        saved_tp1 = load_plain_tensors(str(back / "iter_0000006"))
    finally:
        dist.destroy_process_group()
    assert sorted(saved_tp4) == sorted(saved_tp1)
    tensors = [k for k, v in saved_tp4.items() if isinstance(v, torch.Tensor)]
    assert "decoder.layers.0.self_attention.mamba.in_proj.weight.B" in tensors, tensors
    assert "optimizer.state.exp_avg_sq.decoder.layers.1.self_attention.mamba.conv1d.weight.B" in (
        tensors
    ), tensors
    for k in tensors:
        assert torch.equal(saved_tp4[k], saved_tp1[k]), k
