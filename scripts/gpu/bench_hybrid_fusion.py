#!/usr/bin/env python3
"""Is the parallel-hybrid projection fusion worth building? Separate vs fused GEMMs, fwd+bwd.

A Falcon-H1 parallel layer feeds one normed input to the attention QKV projection and to the
Mamba in_proj, and adds the attention output projection to the Mamba out_proj. The fusion the
throughput issue asks to try: one GEMM for QKV + in_proj (weights stacked along the outputs)
and one for both output projections (inputs concatenated along the features). This times, per
shape, one layer's worth of those projections forward and backward (input and weight gradients)
as CUDA-graph replays (no host time; Megatron's step runs in a graph), in bf16:

- ``in_separate``: ``x W_qkv^T`` and ``x W_in^T``; backward two input-gradient GEMMs + their sum;
- ``in_fused``: ``x [W_qkv; W_in]^T`` split into views; backward: the two output gradients are
  assembled into one (a copy: autograd's gradient of two slices), one dgrad and one wgrad GEMM;
- ``in_fused_contig``: the same, with the Mamba part made contiguous (its kernels take the
  in_proj output as one contiguous tensor: a copy the separate GEMM does not need);
- ``out_separate``: ``a W_proj^T + m W_out^T``;
- ``out_fused``: ``[a | m] [W_proj | W_out]^T``: the producers write separate tensors, so the
  fused GEMM needs their concatenation (a copy) forward and a split of the input gradient.

The result also carries, per shape, the fused variants' outputs / gradients compared with the
separate ones (max abs difference over max abs value: not zero in general, the GEMMs accumulate
in another order), and the per-step saving (x the shape's layer count) next to that step's time
from the benchmark results. Writes ``bench_hybrid_fusion.{json,md}`` with provenance.

    python3 scripts/gpu/bench_hybrid_fusion.py --out-dir OUT [--shapes 0.5b_s2048_b4] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from cuda_timing import graphed, median_ms  # noqa: E402
from provenance import provenance  # noqa: E402

# name: (tokens, hidden, qkv outputs, in_proj outputs, attention proj inputs, out_proj inputs,
# layers). 0.5B: 8 query / 2 KV heads of 64; Mamba 24 heads x 64 (d_inner 1536), 1 group,
# state 128 -> in_proj 2*1536 + 2*128 + 24 = 3352 (scripts/falcon_h1/falcon_h1_args.py).
SHAPES = {
    "0.5b_s2048_b4": (8192, 1024, 768, 3352, 512, 1536, 36),
    "tiny": (12, 16, 8, 20, 8, 12, 2),  # for the CPU test of this script
}
CASES = ("in_separate", "in_fused", "in_fused_contig", "out_separate", "out_fused")


def make_inputs(shape: tuple, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Leaf tensors of one layer's projections (same values for the separate and fused forms)."""
    tokens, hidden, n_qkv, n_in, k_proj, k_out, _ = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "x": rand(tokens, hidden),
        "w_qkv": rand(n_qkv, hidden, scale=hidden**-0.5),
        "w_in": rand(n_in, hidden, scale=hidden**-0.5),
        "dy_qkv": rand(tokens, n_qkv),
        "dy_in": rand(tokens, n_in),
        "a": rand(tokens, k_proj),
        "m": rand(tokens, k_out),
        "w_proj": rand(hidden, k_proj, scale=k_proj**-0.5),
        "w_out": rand(hidden, k_out, scale=k_out**-0.5),
        "dy_o": rand(tokens, hidden),
    }


def case_step(case: str, t: dict) -> Callable[[], tuple]:
    """fwd+bwd of ``case``; returns (outputs..., input gradients..., weight gradients...) in the
    separate form's layout, so every case can be compared with its separate counterpart."""
    if case.startswith("in_"):
        x = t["x"].clone().requires_grad_(True)
        if case == "in_separate":
            w1 = t["w_qkv"].clone().requires_grad_(True)
            w2 = t["w_in"].clone().requires_grad_(True)
            leaves = (x, w1, w2)
        else:
            w = torch.cat([t["w_qkv"], t["w_in"]]).requires_grad_(True)
            leaves = (x, w)
        n1 = t["w_qkv"].shape[0]

        def step() -> tuple:
            for leaf in leaves:
                leaf.grad = None
            if case == "in_separate":
                y1, y2 = x @ leaves[1].t(), x @ leaves[2].t()
            else:
                y = x @ leaves[1].t()
                y1, y2 = y[:, :n1], y[:, n1:]
                if case == "in_fused_contig":
                    y2 = y2.contiguous()
            torch.autograd.backward([y1, y2], [t["dy_qkv"], t["dy_in"]])
            if case == "in_separate":
                dw1, dw2 = leaves[1].grad, leaves[2].grad
            else:
                dw1, dw2 = leaves[1].grad[:n1], leaves[1].grad[n1:]
            return y1, y2, x.grad, dw1, dw2

        return step
    a = t["a"].clone().requires_grad_(True)
    m = t["m"].clone().requires_grad_(True)
    if case == "out_separate":
        wp = t["w_proj"].clone().requires_grad_(True)
        wo = t["w_out"].clone().requires_grad_(True)
        leaves = (a, m, wp, wo)
    else:
        w = torch.cat([t["w_proj"], t["w_out"]], dim=1).requires_grad_(True)
        leaves = (a, m, w)
    k1 = t["w_proj"].shape[1]

    def step() -> tuple:
        for leaf in leaves:
            leaf.grad = None
        if case == "out_separate":
            o = a @ leaves[2].t() + m @ leaves[3].t()
        else:
            o = torch.cat([a, m], dim=1) @ leaves[2].t()
        o.backward(t["dy_o"])
        if case == "out_separate":
            dwp, dwo = leaves[2].grad, leaves[3].grad
        else:
            dwp, dwo = leaves[2].grad[:, :k1], leaves[2].grad[:, k1:]
        return o, a.grad, m.grad, dwp, dwo

    return step


def rel_diff(got: tuple, ref: tuple) -> float:
    """Largest max|got - ref| / max|ref| over the tensors of a step."""
    return max(
        float((g.detach().float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
        for g, r in zip(got, ref)
    )


def run_shape(name: str, device: str, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    """Every case of one shape: time (CUDA), difference from its separate counterpart."""
    tensors = make_inputs(SHAPES[name], device, dtype)
    results: dict = {}
    separate = {}
    for case in CASES:
        step = case_step(case, tensors)
        if device == "cuda":
            replay, static = graphed(step)
            replay()
            torch.cuda.synchronize()
            entry = {"ms": median_ms(replay, warmup, iters)}
        else:
            static, entry = step(), {}
        kind = case.split("_")[0]
        if case.endswith("_separate"):
            separate[kind] = tuple(s.detach().clone() for s in static)
        else:
            entry["rel_diff_vs_separate"] = rel_diff(static, separate[kind])
        results[case] = entry
    if device == "cuda":
        layers = SHAPES[name][-1]
        for kind, fused in (("in", "in_fused"), ("in", "in_fused_contig"), ("out", "out_fused")):
            saved = results[f"{kind}_separate"]["ms"] - results[fused]["ms"]
            results[fused]["saving_ms_per_step"] = saved * layers
    return results


def markdown(report: dict) -> str:
    lines = [
        "# Parallel-hybrid projection fusion: separate vs fused GEMMs (fwd + bwd, graph replays)",
        "",
        f"- device: {report['device']}; commit {report['commit']} (dirty: {report['dirty']})",
        f"- command: `{report['command']}`",
        "",
        "| shape | case | ms per layer | vs separate (rel. diff) | saving per step (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for shape, cases in report["shapes"].items():
        for case, r in cases.items():
            ms = f"{r['ms']:.4f}" if "ms" in r else "-"
            diff = f"{r['rel_diff_vs_separate']:.2e}" if "rel_diff_vs_separate" in r else ""
            saving = f"{r['saving_ms_per_step']:.2f}" if "saving_ms_per_step" in r else ""
            lines.append(f"| {shape} | {case} | {ms} | {diff} | {saving} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shapes", default="0.5b_s2048_b4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float64
    report = {**provenance(sys.argv), "dtype": str(dtype), "shapes": {}}
    for name in shapes:
        report["shapes"][name] = run_shape(name, args.device, dtype, args.warmup, args.iters)
        print(name, json.dumps(report["shapes"][name]), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_hybrid_fusion.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "bench_hybrid_fusion.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
