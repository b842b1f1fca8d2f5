# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""--optimizer-cuda-graph and the parameter schedules: a weight-decay schedule is refused (the
captured step would keep the capture step's weight decay); the learning rate follows the
schedule (tests/unit_tests/optimizer/test_torch_fused_adam.py)."""

import sys

import pytest

from megatron.training.arguments import parse_args, validate_args

WD_SCHEDULE = ["--start-weight-decay", "0.0", "--end-weight-decay", "0.1"]


def _validated(monkeypatch, *flags):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "128",
            "--num-attention-heads", "4", "--max-position-embeddings", "1024",
            "--seq-length", "1024", "--micro-batch-size", "1", "--train-iters", "1",
            "--lr", "1e-4", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--transformer-impl", "local", *flags,
        ],
    )  # fmt: skip
    args = parse_args()
    validate_args(args)
    return args


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_schedule_refused_under_the_optimizer_graph(monkeypatch, style):
    flags = [*WD_SCHEDULE, "--weight-decay-incr-style", style]
    with pytest.raises(ValueError, match=f"--weight-decay-incr-style {style} cannot run with "):
        _validated(monkeypatch, *flags, "--optimizer-cuda-graph")
    assert _validated(monkeypatch, *flags).weight_decay_incr_style == style


def test_constant_weight_decay_runs_under_the_optimizer_graph(monkeypatch):
    args = _validated(monkeypatch, "--optimizer-cuda-graph", "--weight-decay", "0.1")
    assert args.optimizer_cuda_graph and args.weight_decay_incr_style == "constant"
