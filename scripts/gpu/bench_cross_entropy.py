#!/usr/bin/env python3
"""The language-model loss alone: Megatron's cross entropy implementations on bf16 logits.

Why: in the graph-captured Falcon-H1-0.5B training step (8192 tokens x 32784 vocabulary) the
unfused loss (cast of the logits to fp32, max, subtract, exp, sum, divide, then multiply and a
cast back in the backward) took about 5 ms of kernels per step and kept fp32 copies of the
logits (traces of results/h200/falcon_h1/bench_falcon_h1_batch_first.json). Patch 0036 adds
``--cross-entropy-fusion-impl triton`` (two Triton passes over the bf16 logits).

For each case, forward + backward of the per-token loss (output gradient: one over the number of
tokens, as a mean loss gives it) on one rank, timed as CUDA-graph replays (no host time) and
eagerly (with the host's launch time); the peak memory one eager forward + backward adds to the
inputs; and the largest differences of the loss and of the logits gradient from a float64
reference (``torch.logsumexp`` on the same bf16 logits).

Cases: ``unfused`` (``tensor_parallel.vocab_parallel_cross_entropy``, Megatron's default),
``native_fused`` (``--cross-entropy-loss-fusion``: ``fused_vocab_parallel_cross_entropy``),
``triton`` (``--cross-entropy-fusion-impl triton``), ``te`` (Transformer Engine's
``parallel_cross_entropy``; upstream's validate_args refuses it for stability, timed as
information). A case that does not import or run is recorded with its error.

    python3 scripts/gpu/bench_cross_entropy.py --out-dir OUT [--shapes 0.5b_s2048_b4,...]
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

# name: (sequence, micro-batch, vocabulary) of the benchmark cases of bench_falcon_h1.py
SHAPES = {
    "0.5b_s2048_b4": (2048, 4, 32784),
    "1.5b_s4096_b1": (4096, 1, 65537),
    "7b_s4096_b1": (4096, 1, 130048),
}
CASES = ("unfused", "native_fused", "triton", "te")


def loss_function(case: str, group) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-token loss of ``case``: (logits [s, b, v], target [s, b]) -> loss [s, b]."""
    if case == "unfused":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return lambda logits, target: vocab_parallel_cross_entropy(logits, target, tp_group=group)
    if case == "native_fused":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return lambda logits, target: fused_vocab_parallel_cross_entropy(logits, target, group)
    if case == "triton":
        from megatron.core.fusions.fused_cross_entropy_triton import (
            triton_vocab_parallel_cross_entropy,
        )

        return lambda logits, target: triton_vocab_parallel_cross_entropy(logits, target, group)
    if case == "te":
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

        # label smoothing 0, per-token losses, ignore index -100, CUDA-graph capturable
        return lambda logits, target: parallel_cross_entropy(
            logits, target, 0.0, False, group, -100, True
        )
    raise ValueError(f"unknown case {case!r}")


def make_inputs(seq: int, batch: int, vocab: int, device: str, seed: int = 0):
    """bf16 logits with a spread like a trained model's (std 3), targets, output gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(seq, batch, vocab, device=device, generator=gen).mul_(3).bfloat16()
    target = torch.randint(0, vocab, (seq, batch), device=device, generator=gen)
    grad_output = torch.full((seq, batch), 1.0 / (seq * batch), device=device)
    return logits, target, grad_output


def reference(logits: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor):
    """float64 loss and logits gradient of the same bf16 logits."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    grad = torch.exp(x - lse.unsqueeze(-1))
    grad.scatter_add_(-1, target.unsqueeze(-1), -torch.ones_like(lse).unsqueeze(-1))
    grad.mul_(grad_output.double().unsqueeze(-1))
    return loss, grad


def fwd_bwd(fn, logits, target, grad_output):
    """One forward + backward: (loss, logits gradient)."""
    leaf = logits.detach().requires_grad_()
    loss = fn(leaf, target)
    (grad,) = torch.autograd.grad(loss, leaf, grad_output)
    return loss, grad


def run_case(case, group, inputs, ref, device, warmup, iters) -> dict:
    """Errors against ``ref``; on CUDA also graph / eager times and the peak memory added."""
    fn = loss_function(case, group)
    logits, target, grad_output = inputs
    entry: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    loss, grad = fwd_bwd(fn, logits, target, grad_output)
    if device == "cuda":
        torch.cuda.synchronize()
        entry["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    entry["grad_dtype"] = str(grad.dtype).replace("torch.", "")
    entry["loss_max_abs_err"] = float((loss.double() - ref[0]).abs().max())
    entry["grad_max_abs_err"] = float((grad.double() - ref[1]).abs().max())
    entry["grad_max_abs"] = float(ref[1].abs().max())
    del loss, grad
    if device == "cuda":
        step = lambda: fwd_bwd(fn, logits, target, grad_output)  # noqa: E731
        entry["eager_ms"] = median_ms(step, warmup, iters)
        replay, _ = graphed(step)
        entry["graph_ms"] = median_ms(replay, warmup, iters)
    return entry


def run(shapes: list[str], device: str, group, warmup: int, iters: int, cases=CASES) -> dict:
    results: dict = {"shapes": {}}
    for name in shapes:
        seq, batch, vocab = SHAPES[name]
        inputs = make_inputs(seq, batch, vocab, device)
        ref = reference(*inputs)
        per_case: dict = {}
        for case in cases:
            try:
                per_case[case] = run_case(case, group, inputs, ref, device, warmup, iters)
            except Exception as err:  # a missing or failing implementation is a result
                per_case[case] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            print(name, case, json.dumps(per_case[case]), flush=True)
        results["shapes"][name] = {"tokens": seq * batch, "vocab": vocab, "cases": per_case}
        del inputs, ref
    return results


def markdown(report: dict) -> str:
    lines = [
        "# Cross entropy of bf16 logits, forward + backward (one rank)",
        "",
        f"- device: {report['device']}; commit {report['commit']} (dirty: {report['dirty']})",
        f"- command: `{report['command']}`",
        "- graph: CUDA-graph replays (no host time); eager: with the host's launches; peak: "
        "memory one eager forward + backward adds to its inputs; errors: max |difference| from "
        "float64 on the same bf16 logits",
        "",
        "| shape | case | graph ms | eager ms | peak extra MiB | grad dtype | loss err | grad err "
        "(of max grad) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, shape in report["shapes"].items():
        for case, r in shape["cases"].items():
            if "error" in r:
                lines.append(f"| {name} | {case} | {r['error']} | | | | | |")
                continue
            cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("graph_ms", "eager_ms")]
            peak = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else "-"
            rel = r["grad_max_abs_err"] / r["grad_max_abs"] if r["grad_max_abs"] else 0.0
            lines.append(
                f"| {name} | {case} | {cells[0]} | {cells[1]} | {peak} | {r['grad_dtype']} | "
                f"{r['loss_max_abs_err']:.2e} | {r['grad_max_abs_err']:.2e} ({rel:.1e}) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    import tempfile

    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"--shapes: unknown {name!r}; choose from {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            results = run(shapes, "cuda", dist.group.WORLD, args.warmup, args.iters)
        finally:
            dist.destroy_process_group()
    report = {**provenance(sys.argv), **results}
    (args.out_dir / "bench_cross_entropy.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "bench_cross_entropy.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
