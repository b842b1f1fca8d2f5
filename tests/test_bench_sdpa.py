"""scripts/gpu/bench_sdpa.py on CPU (tiny shape): every SDPA call it times computes causal GQA
attention (checked against an independent einsum), and its error measure sees a wrong result."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import bench_sdpa  # noqa: E402


def _einsum_attention(q, k, v):
    """Causal GQA attention on [s, b, n, d] inputs, written out; returns [b, n, s, d]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(q.shape[-1])
    s = q.shape[0]
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bnqk,kbnd->bnqd", scores.softmax(-1), v)


def test_every_call_is_causal_gqa_attention():
    q, k, v, _ = bench_sdpa.make_inputs(bench_sdpa.SHAPES["tiny"], "cpu", torch.float64)
    expected = _einsum_attention(q, k, v)
    for case in ("masked_repeat", "auto", "math"):
        for gqa in (True, False):
            got = bench_sdpa.attention_call(case, gqa)(q, k, v)
            assert torch.allclose(got, expected, atol=1e-12), (case, gqa)
    q, k, v_view, _ = bench_sdpa.make_inputs(
        bench_sdpa.SHAPES["tiny"], "cpu", torch.float64, strided_v=True
    )
    assert not v_view.is_contiguous() and torch.equal(v_view, v)
    got = bench_sdpa.attention_call("auto_strided_v")(q, k, v_view)
    assert torch.allclose(got, expected, atol=1e-12)


def test_error_measure_sees_a_wrong_gradient():
    q, k, v, dout = bench_sdpa.make_inputs(bench_sdpa.SHAPES["tiny"], "cpu", torch.float32)
    ref = bench_sdpa.reference(q, k, v, dout)
    assert bench_sdpa.rel_errors(ref, ref) == {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    wrong = (ref[0], ref[1], ref[2] * 1.01, ref[3])
    assert bench_sdpa.rel_errors(wrong, ref)["dk"] > 1e-3


def test_report(tmp_path):
    assert bench_sdpa.main(["--out-dir", str(tmp_path), "--shapes", "tiny", "--cases",
                            "masked_repeat,auto,math,auto_strided_v,auto_graph,flash_graph", "--device", "cpu"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "bench_sdpa.json").read_text())
    assert len(report["commit"]) == 40 and isinstance(report["dirty"], bool)
    cases = report["shapes"]["tiny"]
    assert cases["math"]["errors"] == {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    for case in ("masked_repeat", "auto", "auto_strided_v", "auto_graph"):
        assert max(cases[case]["errors"].values()) < 1e-5, cases[case]
    assert "| masked_repeat |" in (tmp_path / "bench_sdpa.md").read_text()
