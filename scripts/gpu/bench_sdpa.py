#!/usr/bin/env python3
"""Causal grouped-query attention fwd+bwd on each PyTorch SDPA backend, at Falcon-H1's shapes.

Why: the local spec's ``SDPADotProductAttention`` lets PyTorch pick the kernel. With a mask from
the data loader it took the memory-efficient kernel (48 ms of the 0.5B step on an H200, vs 7 ms
of cuDNN attention in the TE spec). This measures, per shape, what each way of calling SDPA
costs and how far its output and gradients are from an fp32 math-kernel reference:

- ``masked_repeat``: explicit boolean causal mask + K/V repeated per query head (our call when
  the data loader passes a mask);
- ``auto``: ``is_causal=True, enable_gqa=True`` with PyTorch's own choice (our call without a
  mask); the kernels it launched are recorded;
- ``flash`` / ``efficient`` / ``cudnn`` / ``math``: the same call restricted to one backend
  (``torch.nn.attention.sdpa_kernel``); a backend that refuses GQA is retried with K/V repeated
  (``*_repeat``); one that refuses both is recorded as unsupported;
- ``auto_strided_v`` / ``cudnn_strided_v``: ``auto`` / ``cudnn`` with V a strided view of a
  fused ``[s, b, g, (n/g + 2) d]`` projection output, as in Megatron's attention (its query is
  copied by the head reshape and its key by RoPE; the value stays a view);
- ``auto_graph`` / ``flash_graph`` / ``cudnn_graph``: the call captured with its backward in a
  CUDA graph, as Megatron's full-iteration graph captures the step, timed and profiled as graph
  replays (no host launch time; the kernel PyTorch picks while capturing is recorded); errors
  are those of the replayed graph. On CPU these cases run eagerly (errors only).

Inputs are made as Megatron's ``[s, b, n, d]`` and permuted to ``[b, n, s, d]`` as the layer
does. Timing: CUDA events, median of ``--iters`` after ``--warmup``. Writes ``bench_sdpa.json``
and ``bench_sdpa.md`` with the provenance of scripts/lib/provenance.py.

    python3 scripts/gpu/bench_sdpa.py --out-dir OUT [--shapes 0.5b_s2048_b4,...] [--iters 30]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from cuda_timing import graphed, median_ms  # noqa: E402
from provenance import provenance  # noqa: E402

SHAPES = {  # name: (batch, sequence, query heads, kv heads, head dim), as bench_falcon_h1.py
    "0.5b_s2048_b4": (4, 2048, 8, 2, 64),
    "0.5b_s4096_b2": (2, 4096, 8, 2, 64),
    "1.5b-deep_s4096_b1": (1, 4096, 6, 2, 128),
    "tiny": (2, 16, 4, 2, 8),  # for the CPU test of this script
}
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
CASES = [
    "masked_repeat",
    "auto",
    *BACKENDS,
    "auto_strided_v",
    "cudnn_strided_v",
    "auto_graph",
    "flash_graph",
    "cudnn_graph",
]


def make_inputs(
    shape: tuple, device: str, dtype: torch.dtype, seed: int = 0, strided_v: bool = False
) -> tuple:
    """q [s, b, n, d] and k, v [s, b, g, d] (the layer permutes them to [b, heads, s, d]), plus
    the output gradient. ``strided_v``: v is a view of a fused [s, b, g, (n/g + 2) d] leaf."""
    b, s, n, g, d = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        t = torch.randn(s, b, heads, d, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(True)

    q, k, v = rand(n), rand(g), rand(g)
    if strided_v:
        fused = torch.zeros(s, b, g, (n // g + 2) * d, device=device, dtype=dtype)
        fused[..., -d:] = v.detach()
        v = fused.requires_grad_(True)[..., -d:]
        v.retain_grad()
    dout = torch.randn(b, n, s, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, dout


def _bnsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def attention_call(case: str, gqa: bool = True) -> Callable:
    """The SDPA call of ``case`` on [s, b, n, d] inputs; ``gqa=False`` repeats K/V instead."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = _bnsd(q), _bnsd(k), _bnsd(v)
        rep = q.shape[1] // k.shape[1]
        if case == "masked_repeat":
            s = q.shape[2]
            mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            mask = mask[None, None].expand(q.shape[0], 1, s, s)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if not gqa:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if case.startswith("auto"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel([BACKENDS[case.removesuffix("_strided_v").removesuffix("_graph")]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    return call


def fwd_bwd(call: Callable, q, k, v, dout) -> tuple:
    for t in (q, k, v):
        t.grad = None
    out = call(q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def reference(q, k, v, dout) -> tuple:
    """fp32 math-kernel output and gradients (explicit GQA repeat, no backend choice)."""
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        out = attention_call("math", gqa=False)(q32, k32, v32)
    out.backward(dout.float())
    return out.detach(), q32.grad, k32.grad, v32.grad


def rel_errors(got: tuple, ref: tuple) -> dict:
    """Max |got - ref| / max |ref| for the output and each input gradient."""
    names = ("out", "dq", "dk", "dv")
    return {
        n: float((g.detach().float() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        for n, g, r in zip(names, got, ref)
    }


def kernel_names(step: Callable[[], object]) -> list[str]:
    """The GPU kernels of one ``step`` (for ``auto``: which backend PyTorch chose)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_type.name == "CUDA"}
    return sorted(n for n in names if "elementwise" not in n)[:8]


def run_case(case: str, shape: tuple, device: str, dtype, warmup: int, iters: int) -> dict:
    """Errors (always) and time (on CUDA) of one case; GQA first, then K/V repeated."""
    q, k, v, dout = make_inputs(shape, device, dtype, strided_v=case.endswith("_strided_v"))
    ref = reference(q, k, v, dout)
    only_gqa = ("masked_repeat", "auto", "auto_strided_v", "auto_graph")
    attempts = [True] if case in only_gqa else [True, False]
    use_graph = case.endswith("_graph") and device == "cuda"
    refusals = []
    for gqa in attempts:
        call = attention_call(case, gqa)
        try:
            got = fwd_bwd(call, q, k, v, dout)
            if use_graph:
                step, got = graphed(lambda: fwd_bwd(call, q, k, v, dout))
                step()
                torch.cuda.synchronize()
            else:
                step = functools.partial(fwd_bwd, call, q, k, v, dout)
        except RuntimeError as err:  # "No available kernel": this backend refuses the inputs
            refusals.append(f"{'gqa' if gqa else 'repeat'}: {str(err).splitlines()[0][:200]}")
            continue
        entry = {"gqa": gqa, "errors": rel_errors(got, ref), "refused": refusals}
        if device == "cuda":
            entry["ms"] = median_ms(step, warmup, iters)
            if case.startswith("auto") or use_graph:
                entry["kernels"] = kernel_names(step)
        return entry
    return {"unsupported": True, "refused": refusals}


def markdown(report: dict) -> str:
    lines = [
        "# Causal GQA attention fwd+bwd per SDPA backend",
        "",
        f"- device: {report['device']}; date (UTC): {report['date_utc']}",
        f"- commit: {report['commit']} (dirty: {report['dirty']})",
        f"- versions: torch {report['versions'].get('torch')}",
        f"- command: `{report['command']}`",
        "- errors: max |x - ref| / max |ref| against the fp32 math kernel (out, dq, dk, dv)",
        "",
    ]
    for name, cases in report["shapes"].items():
        b, s, n, g, d = SHAPES[name]
        lines += [
            f"## {name} (batch {b}, seq {s}, {n} query / {g} kv heads, head dim {d})",
            "",
            "| case | ms fwd+bwd | K/V | max rel. error (out / dq / dk / dv) |",
            "|---|---:|---|---|",
        ]
        for case, r in cases.items():
            if r.get("unsupported"):
                lines.append(f"| {case} | unsupported | | {'; '.join(r['refused'])[:160]} |")
                continue
            err = " / ".join(f"{r['errors'][x]:.1e}" for x in ("out", "dq", "dk", "dv"))
            ms = f"{r['ms']:.3f}" if "ms" in r else "-"
            kv = "enable_gqa" if r["gqa"] and case != "masked_repeat" else "repeated"
            lines.append(f"| {case} | {ms} | {kv} | {err} |")
        for case in ("auto", "auto_strided_v", "auto_graph", "flash_graph", "cudnn_graph"):
            kernels = cases.get(case, {}).get("kernels")
            if kernels:
                short = sorted({k.split("(")[0].split("<")[0][:60] for k in kernels})
                lines += ["", f"`{case}` launched: {', '.join(short)}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shapes", default="0.5b_s2048_b4,0.5b_s4096_b2,1.5b-deep_s4096_b1")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    cases = args.cases.split(",")
    for value, known, flag in ((shapes, SHAPES, "--shapes"), (cases, CASES, "--cases")):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    report = {**provenance(sys.argv), "dtype": str(dtype), "shapes": {}}
    for name in shapes:
        report["shapes"][name] = {
            case: run_case(case, SHAPES[name], args.device, dtype, args.warmup, args.iters)
            for case in cases
        }
        print(name, json.dumps(report["shapes"][name]), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_sdpa.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "bench_sdpa.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
