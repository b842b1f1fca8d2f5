#!/usr/bin/env python3
"""The optimizer step of the Falcon-H1-0.5B shape: Transformer Engine's FusedAdam vs PyTorch's.

Why: in the graph-captured 0.5B training step, TE's capturable multi-tensor Adam takes ~7.6 ms
of ~110 ms (results/h200/falcon_h1/), about half the memory bandwidth an Adam step over its
fp32 parameters, gradients and moments needs. This times one AdamW step (decoupled weight decay,
as Megatron's default) over fp32 tensors of the 0.5B model's shapes, each optimizer captured in a
CUDA graph as Megatron's optimizer graph does (replays: no host time), and reports the step's
effective bandwidth and how far the parameters of each optimizer are from TE's after a few steps.

Cases: ``te_fused`` (``transformer_engine.pytorch.optimizers.FusedAdam(capturable=True,
adam_w_mode=True)``, what Megatron picks when TE is installed), ``torch_fused``
(``torch.optim.AdamW(fused=True, capturable=True)``), ``torch_foreach``
(``torch.optim.AdamW(foreach=True, capturable=True)``, Megatron's fallback without TE / apex).
A case whose optimizer does not import or run is recorded with the error.

    python3 scripts/gpu/bench_adam.py --out-dir OUT [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from cuda_timing import graphed, median_ms  # noqa: E402
from provenance import provenance  # noqa: E402

HPARAMS = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CASES = ("te_fused", "torch_fused", "torch_foreach")


def model_shapes(
    layers: int = 36, hidden: int = 1024, vocab: int = 32768, scale: int = 1
) -> list[tuple]:
    """Parameter shapes of a Falcon-H1-0.5B-like model (``scale`` divides every dimension, for
    the CPU test): embedding, untied output layer, and per parallel layer its projections,
    norms and Mamba vectors (scripts/falcon_h1/falcon_h1_args.py --preset 0.5b)."""
    h, v = hidden // scale, vocab // scale
    per_layer = [
        (768 // scale, h), (3352 // scale, h), (h, 512 // scale), (h, 1536 // scale),
        (4096 // scale, h), (h, 2048 // scale), (h,), (h,), (24,), (24,), (24,),
        (1792 // scale, 4),
    ]  # fmt: skip
    return [(v, h), (v, h), (h,)] + per_layer * layers


def make_optimizer(case: str, params: list[torch.Tensor]):
    """The optimizer of ``case`` over ``params`` (fp32 leaves with .grad set); capturable
    (graph-safe) on CUDA."""
    capturable = params[0].is_cuda
    if case == "te_fused":
        from transformer_engine.pytorch.optimizers import FusedAdam

        return FusedAdam(params, capturable=capturable, adam_w_mode=True, **HPARAMS)
    if case == "torch_fused":
        return torch.optim.AdamW(params, fused=True, capturable=capturable, **HPARAMS)
    return torch.optim.AdamW(params, foreach=True, capturable=capturable, **HPARAMS)


def make_params(shapes: list[tuple], device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(*shape, generator=g) * 0.02).to(device))
        p.grad = (torch.randn(*shape, generator=g) * 1e-3).to(device)
        params.append(p)
    return params


def run(device: str, shapes: list[tuple], warmup: int, iters: int, steps: int = 4) -> dict:
    """Every case: time per step (CUDA), and parameters after ``steps`` eager steps from the
    same start compared with the first case that ran (max relative difference)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    results: dict = {"numel": numel, "cases": {}}
    reference = None
    for case in CASES:
        entry: dict = {}
        try:
            params = make_params(shapes, device)
            opt = make_optimizer(case, params)
            for _ in range(steps):
                opt.step()
            final = torch.cat([p.detach().reshape(-1) for p in params])
            if reference is None:
                reference, entry["reference"] = final, True
            else:
                diff = (final - reference).abs().max() / reference.abs().max()
                entry["rel_diff_vs_reference"] = float(diff)
            if device == "cuda":
                params = make_params(shapes, device)
                opt = make_optimizer(case, params)
                entry["ms"] = median_ms(graphed(opt.step)[0], warmup, iters)
                # fp32 param, grad, exp_avg, exp_avg_sq read; param and both moments written
                entry["effective_tb_s"] = numel * 4 * 7 / (entry["ms"] * 1e-3) / 1e12
        except Exception as err:  # a missing or failing optimizer is a result, not a crash
            entry = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        results["cases"][case] = entry
        print(case, json.dumps(entry), flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [
        "# AdamW step over the 0.5B model's fp32 parameters (CUDA-graph replays)",
        "",
        f"- device: {report['device']}; commit {report['commit']} (dirty: {report['dirty']})",
        f"- command: `{report['command']}`; {report['numel'] / 1e6:.1f}M parameters",
        "",
        "| optimizer | ms per step | effective TB/s | max rel. diff of params after 4 steps |",
        "|---|---:|---:|---:|",
    ]
    for case, r in report["cases"].items():
        if "error" in r:
            lines.append(f"| {case} | {r['error']} | | |")
            continue
        ref = "reference" if r.get("reference") else f"{r.get('rel_diff_vs_reference', 0):.2e}"
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        bw = f"{r['effective_tb_s']:.2f}" if "effective_tb_s" in r else "-"
        lines.append(f"| {case} | {ms} | {bw} | {ref} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension (tests)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    shapes = model_shapes(scale=args.scale)
    report = {**provenance(sys.argv), **run(args.device, shapes, args.warmup, args.iters)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_adam.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "bench_adam.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
