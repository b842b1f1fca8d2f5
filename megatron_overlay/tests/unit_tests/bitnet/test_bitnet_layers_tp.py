# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Tensor-parallel invariance of the BitNet layers: TP=2 (two gloo processes) vs TP=1.

The same FULL weight is sharded the way Megatron shards it (column: output rows, with whole
query groups for linear_qkv and each rank's half of gate and of up for a gated linear_fc1;
row: input columns).  Quantised weights and betas must be identical to TP=1, column-parallel
outputs bit-identical, and row-parallel outputs / all gradients equal up to the fp32 order of
the cross-rank sums.  Covers sequence parallelism, gather_output, a scattered row input,
skip_bias_add, main_grad accumulation, the input RMSNorm, and the absence of host syncs.
All cases run in one 2-process world (see bitnet_tp_worker.py).
"""

import contextlib
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core.tensor_parallel", reason="needs the patched Megatron tree")

from tests.unit_tests.bitnet import bitnet_tp_worker  # noqa: E402
from tests.unit_tests.bitnet.bitnet_layer_helpers import (  # noqa: E402
    assert_close,
    assert_forward_close,
    ref_linear,
)
from tests.unit_tests.gloo_ranks import forkserver_env  # noqa: E402

WORLD = 2
# "forkserver" (default): a clean server process imports Megatron once (preloaded below) and
# forks the ranks from it.  "spawn" re-imports Megatron in every rank (slower on 2 cores).
# Plain "fork" is unsafe here: a rank would inherit the pytest process's gloo groups from
# earlier tests, and destroying those in the child hangs (their threads do not exist there).
START_METHOD = os.environ.get("BITNET_TP_TEST_START_METHOD", "forkserver")
_PRELOAD = [
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.bitnet.layers",
    "tests.unit_tests.bitnet.bitnet_layer_helpers",
    "tests.unit_tests.bitnet.bitnet_tp_worker",
]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("bitnet_tp")
    names = list(bitnet_tp_worker.CASES)
    if START_METHOD == "forkserver":
        # No effect if this process already runs a fork server (the ranks then import
        # themselves).
        import megatron.core

        roots = [str(Path(megatron.core.__file__).parents[2])]  # holds megatron/ and tests/
        roots += os.environ.get("PYTHONPATH", "").split(os.pathsep)
        env = forkserver_env(_PRELOAD, roots)
    else:
        env = contextlib.nullcontext()
    with env:
        mp.start_processes(
            bitnet_tp_worker.worker,
            args=(WORLD, str(tmp / "dist_init"), str(tmp), names),
            nprocs=WORLD,
            join=True,
            start_method=START_METHOD,
        )
    return {name: torch.load(tmp / f"{name}.pt", weights_only=False) for name in names}


@pytest.mark.parametrize("name", list(bitnet_tp_worker.CASES))
def test_tp2_equals_tp1(tp_results, name):
    data = tp_results[name]
    tp, ref, case = data["tp"], data["ref"], data["case"]
    column = case["kind"] == "column"

    # identical quantisation: T and beta of every logical matrix, whatever the TP size
    assert torch.equal(tp["t"], ref["t"])
    assert torch.equal(tp["beta_rows"], ref["beta_rows"])
    if column and case["role"] in ("linear_qkv", "linear_fc1") and case.get("gated", True):
        assert len(set(ref["beta_rows"].tolist())) == (3 if case["role"] == "linear_qkv" else 2)
    else:
        assert all(r["beta_is_scalar"] for r in data["ranks"]) and ref["beta_is_scalar"]
    if not column:
        assert tp["beta_equal_on_ranks"]

    # the TP=1 layer itself follows the formula (so TP=2 == TP=1 is not vacuous)
    if not case.get("rms"):
        with_bias = case.get("bias", True) and not case.get("skip_bias_add", False)
        bias = _full_bias(data) if with_bias else None
        f = ref_linear(ref["x_full"], ref["w_full"], ref["seg"], bias)
        assert torch.equal(f["t"], ref["t"])
        assert_forward_close(ref["y"], f, bias)

    # outputs: column-parallel bit-identical; row-parallel up to the order of the TP sum
    assert tp["y"].shape == ref["y"].shape
    if column:
        assert torch.equal(tp["y"], ref["y"])
    else:
        assert_close(tp["y"], ref["y"], rtol=1e-6)
    for key in ("y_equal_on_ranks", "dx_equal_on_ranks"):
        if key in tp:
            assert tp[key], key
    assert all(r["out_bias_is_bias"] == case.get("skip_bias_add", False) for r in data["ranks"])

    # gradients (identity STE), all relative to the largest magnitude
    assert_close(tp["dx"], ref["dx"], rtol=1e-6)
    assert_close(tp["dw"], ref["dw"], rtol=1e-6)
    if case.get("gaf"):
        assert all(r["w_grad_is_none"] for r in data["ranks"]) and ref["w_grad_is_none"]
    if ref["db"] is not None:
        assert_close(tp["db"], ref["db"], rtol=1e-6)
    if case.get("rms"):
        assert ref["dnorm"] is not None and tp["dnorm"] is not None
        assert_close(tp["dnorm"], ref["dnorm"], rtol=1e-5)

    # distributed checkpoints see the full (TP=1) shapes, norm weight included
    full_w = tuple(ref["dw"].shape)
    for r in data["ranks"]:
        shapes = r["sharded_shapes"]
        assert shapes["weight"] == full_w
        if case.get("rms"):
            assert shapes["rms_norm.weight"] == (full_w[1],)


def _full_bias(data):
    """The bias both layers used (the workers' seeds, see bitnet_tp_worker)."""
    out = data["ref"]["y"].shape[-1]
    seed = 2 if data["case"]["kind"] == "column" else 12
    return bitnet_tp_worker._randn(out, seed=seed, scale=0.1)
