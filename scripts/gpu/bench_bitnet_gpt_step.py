#!/usr/bin/env python3
"""GPU benchmark: a whole BitNet GPT training step vs the same model in bf16 (pretrain_gpt.py).

Runs pretrain_gpt.py on one GPU with identical arguments (a Llama-3-8B-like layer shape:
hidden 4096, ffn 14336, 32 heads / 8 KV heads, 4 layers, 8192 tokens per micro-batch, bf16,
local transformer implementation) once per variant: ``bf16`` (plain), ``bitnet``
(--use-bitnet, defaults), ``bitnet_dgrad_cached`` (--bitnet-dgrad cublas_cached: the bf16
beta*T operand kept in the weight cache for the step) and ``bitnet_dgrad_triton``; it reports the
median iteration time after warm-up and the peak allocated memory Megatron logs. Writes JSON
and a markdown table to --out-dir (file names carry a suffix when --micro-batches > 1).

    python scripts/gpu/bench_bitnet_gpt_step.py --out-dir results/ [--iters 30]
        [--variants bf16,bitnet] [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)


VARIANTS = {  # name: extra pretrain_gpt.py arguments
    "bf16": [],
    "bitnet": ["--use-bitnet"],
    "bitnet_dgrad_cached": ["--use-bitnet", "--bitnet-dgrad", "cublas_cached"],
    "bitnet_dgrad_triton": ["--use-bitnet", "--bitnet-dgrad", "triton"],
}


GPT_MODEL = [
    "--vocab-size", "32000", "--num-layers", "4", "--hidden-size", "4096",
    "--ffn-hidden-size", "14336", "--num-attention-heads", "32", "--group-query-attention",
    "--num-query-groups", "8", "--swiglu", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights",
]
MODELS = {  # name: (entry point, description)
    "gpt": ("pretrain_gpt.py", "GPT, 4 layers, hidden 4096, ffn 14336, 32/8 heads"),
    "falcon_h1_0.5b": (
        "pretrain_mamba.py",
        "Falcon-H1-0.5B shape (36 parallel attention+Mamba-2 layers, hidden 1024, all "
        "multipliers; scripts/falcon_h1/falcon_h1_args.py --preset 0.5b)",
    ),
}


def model_args(model: str) -> list[str]:
    if model == "gpt":
        return GPT_MODEL
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/falcon_h1/falcon_h1_args.py"), "--preset", "0.5b"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.split()


def run(
    megatron: Path,
    model: str,
    extra: list[str],
    iters: int,
    micro_batches: int,
    log: Path,
) -> dict:
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
        "--master-port", "29555", str(megatron / MODELS[model][0]),
        "--transformer-impl", "local", "--bf16", "--mock-data", "--tokenizer-type",
        "NullTokenizer", *model_args(model), "--seq-length", "2048",
        "--max-position-embeddings", "2048", "--micro-batch-size", "4", "--global-batch-size", str(4 * micro_batches),
        "--train-iters", str(iters), "--lr", "1e-4", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", "100000", "--no-gradient-accumulation-fusion",
        "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
        "--no-rope-fusion",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--log-memory-to-tensorboard",
        "--tensorboard-dir", str(log.parent / "tb"), *extra,
    ]
    env = dict(os.environ, PYTHONPATH=f"{megatron}:{os.environ.get('PYTHONPATH', '')}")
    with open(log, "w") as fh:
        proc = subprocess.run(args, cwd=megatron, env=env, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({extra}); tail:\n" + "\n".join(text.splitlines()[-30:]))
    times = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)", text)
    }
    losses = [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", text)]
    peak = [float(v) for v in re.findall(r"max allocated: ([0-9.]+)", text)]
    steady = [t for i, t in times.items() if i > iters // 3]
    return {
        "median_ms": statistics.median(steady),
        "steady_iterations": len(steady),
        "peak_allocated_mb": max(peak) if peak else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--megatron", type=Path, default=ROOT / "build" / "Megatron-LM")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--model", choices=list(MODELS), default="gpt")
    parser.add_argument(
        "--variants",
        default="bf16,bitnet,bitnet_dgrad_cached",
        help="comma list of " + ",".join(VARIANTS) + " (bf16 is always run: the baseline)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches per step (gradient accumulation; global batch = 4 x this)",
    )
    args = parser.parse_args()
    variants = ["bf16"] + [v for v in args.variants.split(",") if v and v != "bf16"]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if args.micro_batches < 1:
        parser.error("--micro-batches must be >= 1")
    suffix = "" if args.micro_batches == 1 else f"_mb{args.micro_batches}"
    if args.model != "gpt":
        suffix = f"_{args.model}{suffix}"
    args.megatron = args.megatron.resolve()
    args.out_dir = args.out_dir.resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    results = {}
    for name in variants:
        extra = VARIANTS[name]
        log = args.out_dir / f"gpt_step_{name}{suffix}.log"
        results[name] = run(
            args.megatron, args.model, extra, args.iters, args.micro_batches, log
        )
        print(name, results[name], flush=True)
    base = results["bf16"]
    for name, r in results.items():
        r["step_time_ratio_over_bf16"] = r["median_ms"] / base["median_ms"]
        r["peak_memory_ratio_over_bf16"] = (
            r["peak_allocated_mb"] / base["peak_allocated_mb"]
            if r["peak_allocated_mb"] and base["peak_allocated_mb"]
            else None
        )
    main_variant = "bitnet" if "bitnet" in results else variants[-1]
    ratio = results[main_variant]["step_time_ratio_over_bf16"]
    mem = results[main_variant]["peak_memory_ratio_over_bf16"]
    report = {
        "benchmark": "bitnet_gpt_training_step",
        **provenance(sys.argv),
        "model": f"{MODELS[args.model][1]}, seq 2048 x mbs 4, bf16",
        "micro_batches_per_step": args.micro_batches,
        "results": results,
        "compared_variant": main_variant,
        "step_time_ratio_bitnet_over_bf16": ratio,
        "peak_memory_ratio_bitnet_over_bf16": mem,
        "targets": {"step_time_ratio": 1.05, "peak_memory_ratio": 1.05},
    }
    (args.out_dir / f"bench_bitnet_gpt_step{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# BitNet {args.model} training step vs bf16",
        "",
        f"- device: {report['device']}; date (UTC): {report['date_utc']}; torch {torch.__version__}",
        f"- commit: {report['commit']} (dirty: {report['dirty']})",
        f"- command: `{report['command']}`",
        f"- model: {report['model']}; {args.micro_batches} micro-batch(es) per step; median of "
        f"iterations > {args.iters // 3}",
        "",
        "| run | step ms | x bf16 | peak allocated MB | x bf16 | first / last lm loss |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        pm = r["peak_memory_ratio_over_bf16"]
        md.append(
            f"| {name} | {r['median_ms']:.1f} | {r['step_time_ratio_over_bf16']:.3f} | "
            f"{r['peak_allocated_mb']} | {'n/a' if pm is None else f'{pm:.4f}'} | "
            f"{r['first_loss']} / {r['last_loss']} |"
        )
    md += [
        "",
        f"{main_variant}/bf16: step time {ratio:.3f} (target <= 1.05); peak memory "
        f"{'n/a' if mem is None else f'{mem:.4f}'} (target <= 1.05)",
    ]
    (args.out_dir / f"bench_bitnet_gpt_step{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
