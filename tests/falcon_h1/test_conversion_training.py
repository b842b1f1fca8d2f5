"""A converted HF Falcon-H1 checkpoint resumes training through pretrain_mamba.py (CPU).

HF (release-like tiny config: n_groups 1, no Mamba norm) -> Megatron torch_dist with the
converter, then ``pretrain_mamba.py --load CKPT --use-checkpoint-args`` with no model flags
trains a few steps: the checkpoint loads strictly, the model is rebuilt from the recorded args
(multipliers and shapes included) and training runs. Logit equality with HF after conversion is
checked in test_conversion.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from falcon_h1.oracle import MULTIPLIERS_0_5B, TinyShape, build_hf_model

pytestmark = pytest.mark.megatron


def test_converted_checkpoint_trains_with_checkpoint_args(tmp_path, megatron_tree):
    shape = TinyShape(layers=2, mamba_groups=1, rms_norm=False, vocab=128)
    hf = build_hf_model(shape, MULTIPLIERS_0_5B)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    ckpt = tmp_path / "megatron"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = str(megatron_tree)
    convert = subprocess.run(
        [sys.executable, str(megatron_tree / "tools/checkpoint/falcon_h1_conversion.py"),
         "hf-to-megatron", "--hf-dir", str(hf_dir), "--save-dir", str(ckpt),
         "--target-tp", "1", "--target-pp", "1", "--ckpt-format", "torch_dist"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert convert.returncode == 0, (convert.stdout + convert.stderr)[-3000:]

    train = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
         "--master-port", "29617", str(megatron_tree / "pretrain_mamba.py"),
         "--load", str(ckpt), "--use-checkpoint-args", "--no-load-optim", "--no-load-rng",
         "--finetune", "--device", "cpu", "--transformer-impl", "local", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", str(shape.vocab),
         "--ckpt-format", "torch_dist", "--seq-length", "32", "--max-position-embeddings", "256",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3",
         "--lr", "1e-4", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
         "--attention-dropout", "0.0", "--hidden-dropout", "0.0"],
        capture_output=True, text=True, env=env, cwd=megatron_tree, timeout=600,
    )
    output = train.stdout + train.stderr
    assert train.returncode == 0, output[-4000:]
    assert re.search(r"successfully loaded checkpoint from .*megatron", output), output[-3000:]
    # The model came from the checkpoint args alone: the multipliers and shapes are HF's.
    assert re.search(r"embedding_multiplier \.+ 5\.656854249492381", output)
    assert re.search(r"hybrid_layer_pattern \.+ PP\b", output)
    assert re.search(r"kv_channels \.+ 24\b", output)
    losses = [float(v) for v in re.findall(r"iteration\s+\d+/\s*3 \|.*?lm loss: ([0-9.E+-]+)", output)]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses), losses
