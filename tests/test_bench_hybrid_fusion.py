"""scripts/gpu/bench_hybrid_fusion.py on CPU (tiny shape, float64): every case it times computes
the projections and gradients written out below, and its difference measure sees a wrong one."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import bench_hybrid_fusion as bench  # noqa: E402


def _expected(t: dict) -> dict:
    x, w1, w2, d1, d2 = t["x"], t["w_qkv"], t["w_in"], t["dy_qkv"], t["dy_in"]
    a, m, wp, wo, do = t["a"], t["m"], t["w_proj"], t["w_out"], t["dy_o"]
    return {
        "in": (x @ w1.t(), x @ w2.t(), d1 @ w1 + d2 @ w2, d1.t() @ x, d2.t() @ x),
        "out": (a @ wp.t() + m @ wo.t(), do @ wp, do @ wo, do.t() @ a, do.t() @ m),
    }


def test_every_case_computes_the_projections_and_their_gradients():
    t = bench.make_inputs(bench.SHAPES["tiny"], "cpu", torch.float64)
    expected = _expected(t)
    for case in bench.CASES:
        got = bench.case_step(case, t)()
        want = expected[case.split("_")[0]]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-12), case


def test_cpu_run_reports_tiny_differences_and_a_wrong_result_is_seen():
    results = bench.run_shape("tiny", "cpu", torch.float64, 0, 1)
    assert set(results) == set(bench.CASES)
    for case in ("in_fused", "in_fused_contig", "out_fused"):
        assert results[case]["rel_diff_vs_separate"] < 1e-12
    t = bench.make_inputs(bench.SHAPES["tiny"], "cpu", torch.float64)
    good = bench.case_step("out_separate", t)()
    t["w_out"] = t["w_out"] * 1.001  # a fused weight with a wrong block
    assert bench.rel_diff(bench.case_step("out_fused", t)(), good) > 1e-4
