# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Mamba-2 at more tensor-parallel ranks than B/C groups (CPU gloo ranks, float64).

``MambaMixer`` with ``--mamba-num-groups`` 1 at TP=2 and TP=4 (and 2 groups at TP=4), the gated
RMSNorm on and off, memory-efficient and plain paths, Falcon-H1 multipliers on every in_proj
segment: every rank holds its even share of each ``in_proj`` / ``conv1d`` component (a slice of
its group's B / C), gathers the group's B / C, and reduces the norm's sum of squares across
the ranks sharing a group. Output, input gradient and every parameter gradient (reassembled to
the global layout) equal the one-rank mixer's with the same global weights, to float64
summation-order round-off; a static-inference prefill + decode step equals the full forward.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit_tests.ssm import mamba_tp_groups_worker as w

CASES = {
    "g1_norm_memeff": dict(groups=1, rms_norm=True, mem_eff=True, decode=True),
    "g1_nonorm_memeff": dict(groups=1, rms_norm=False, mem_eff=True),
    "g1_norm_plain": dict(groups=1, rms_norm=True, mem_eff=False),
    "g2_norm_memeff": dict(groups=2, rms_norm=True, mem_eff=True, decode=True),
}
# Cases each world runs (2 groups need TP=4 to be shared).
WORLDS = {1: list(CASES), 2: [k for k in CASES if CASES[k]["groups"] == 1], 4: list(CASES)}


def _weights(case: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = {name: sum(sizes) for name, sizes in w.segments(case).items()}
    out = {
        "in_proj.weight": torch.randn(rows["in_proj.weight"], w.HIDDEN, generator=g) * 0.2,
        "conv1d_weight": torch.randn(rows["conv1d_weight"], 1, 4, generator=g) * 0.4,
        "conv1d_bias": torch.randn(rows["conv1d_bias"], generator=g) * 0.2,
        "dt_bias": torch.randn(rows["dt_bias"], generator=g) * 0.5,
        "A_log": torch.rand(rows["A_log"], generator=g) * 2.0 - 0.5,
        "D": torch.randn(rows["D"], generator=g) * 0.5,
        "out_proj.weight": torch.randn(w.HIDDEN, rows["norm.weight"], generator=g) * 0.2,
    }
    if case["rms_norm"]:
        out["norm.weight"] = 1.0 + 0.2 * torch.randn(rows["norm.weight"], generator=g)
    return {k: v.double() for k, v in out.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("mamba_tp")
    g = torch.Generator().manual_seed(5)
    data = {
        "x": torch.randn(w.SEQ, w.BATCH, w.HIDDEN, generator=g).double(),
        "grad_out": torch.randn(w.SEQ, w.BATCH, w.HIDDEN, generator=g).double(),
    }
    weights = {key: _weights(case, i) for i, (key, case) in enumerate(CASES.items())}
    torch.save({"data": data, "weights": weights}, work / "inputs.pt")
    out = {}
    for world, keys in WORLDS.items():
        spec = {"work": str(work), "cases": {k: CASES[k] for k in keys}}
        out[world] = w.run_world(world, spec)
    return out


def _check(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-12 * max(scale, 1.0), f"{what}: max |diff| {diff:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("world", [2, 4])
def test_mixer_matches_one_rank(results, world):
    for key in WORLDS[world]:
        case = CASES[key]
        ref = results[1][0][key]
        assert "error" not in ref, ref
        ranks = [r[key] for r in results[world]]
        for rank, got in enumerate(ranks):
            assert "error" not in got, (key, rank, got)
            _check(ref["out"], got["out"], f"{key} TP={world} rank {rank} output")
            _check(ref["grad_x"], got["grad_x"], f"{key} TP={world} rank {rank} input grad")
            if case.get("decode"):
                _check(ref["out"][:, :1], got["decode"], f"{key} TP={world} rank {rank} decode")
        for name, ref_grad in ref["grads"].items():
            got = w.unshard(name, [r["grads"][name] for r in ranks], case)
            _check(ref_grad, got, f"{key} TP={world} grad of {name}")


def test_decode_matches_full_forward_on_one_rank(results):
    for key, case in CASES.items():
        if case.get("decode"):
            ref = results[1][0][key]
            _check(ref["out"][:, :1], ref["decode"], f"{key} TP=1 decode")
