#!/usr/bin/env python3
"""GPU benchmark: Falcon-H1 training step, HF transformers vs this project's Megatron, one job.

For each case (model shape x sequence x micro-batch) it trains the same model, bf16, Adam-family
optimizer, gradient clipping 1.0, random tokens, on one GPU:

* ``hf``: HF ``FalconH1ForCausalLM`` (bf16 parameters, SDPA attention, ``torch.optim.AdamW(fused=
  True)``), with whatever Mamba path transformers picks (mamba_ssm / causal_conv1d when
  importable; the path actually taken is read from the kernels in the profile);
  ``hf_compile`` (``torch.compile(model)``) and ``hf_liger`` (Liger-Kernel's Falcon-H1 patches)
  as information, where they run.
* ``ours_*``: ``pretrain_mamba.py`` of the patched tree with the same model (flags derived from
  the same HF config by the checkpoint converter's mapping), mixed precision (bf16 compute, fp32
  master weights and gradients), Adam; variants: local / Transformer Engine spec, eager /
  full-iteration CUDA graph (+ optimizer graph), batch-first Mamba layers (``_bf``), the
  distributed optimizer (``_dist``), per-layer graphs (``_layer_graph``), BitNet.

Per run: step time = the median over timing windows of --log-interval steps (after warm-up and
graph capture) of each window's mean step time (Megatron logs, and reads the GPU, once per
window with its --log-interval; the HF loop reads its losses once per window too), tokens/s, peak
allocated memory, the logged losses (ours: one mean per window; HF: every step), GPU-busy
fraction of the last two steps (torch profiler: union of kernel/memcpy time over the steps'
wall time, scripts/lib/gpu_trace.py; the last is a log step where --iters is a multiple of
--log-interval), the top kernels, and MFU = tokens/s x training FLOPs per token
(scripts/falcon_h1/flops.py) / the bf16 matmul rate measured at the start of the same job. Runs
that fail are recorded with their error and do not stop the job. Writes ``bench_falcon_h1.json``
and ``.md`` to --out-dir after every run.

A device call is limited in time: ``--deadline-s`` starts no run after that many seconds, and
``--resume`` keeps the successful runs of an earlier call's JSON (same clean commit, same device
name). Ratios to HF (``over_hf``, ``ours_over_hf``) are only formed between runs of one call:
host-bound step times differ between machine instances.

    python scripts/gpu/bench_falcon_h1.py --out-dir results/h200/falcon_h1 \
        [--cases 0.5b_s2048_b4,...] [--systems hf,ours_te_graph,...] \
        [--iters 50] [--log-interval 10] [--deadline-s 480] [--resume earlier.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402

use("overlay_checkpoint_tools", "falcon_h1_scripts")
from falcon_h1_args import MULTIPLIERS_0_5B  # noqa: E402
from flops import FalconH1Dims, training_flops_per_token  # noqa: E402
from gpu_trace import (  # noqa: E402
    gpu_busy_fraction,
    host_hotspots,
    idle_by_host_function,
    kernel_names,
    load_trace,
    top_kernels,
)


def _hf_config(layers, hidden, heads, kv, head_dim, m_heads, m_dim, d_state, groups, ffn,
               vocab, rms_norm) -> dict:  # fmt: skip
    return dict(
        architectures=["FalconH1ForCausalLM"], model_type="falcon_h1",
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, hidden_act="silu",
        rms_norm_eps=1e-5, max_position_embeddings=8192, mamba_d_ssm=m_heads * m_dim,
        mamba_n_heads=m_heads, mamba_d_head=m_dim, mamba_n_groups=groups, mamba_d_state=d_state,
        mamba_d_conv=4, mamba_chunk_size=128, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_norm_before_gate=False, mamba_rms_norm=rms_norm, projectors_bias=False,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, rope_theta=1e11,
        **MULTIPLIERS_0_5B,
    )  # fmt: skip


# Shapes: DESIGN.md section 3. 0.5B: the verified release shape and multipliers. 1.5B-Deep:
# layers/hidden/heads/Mamba sizes from DESIGN.md; ffn 3072 and vocab 65536 are not verified here
# (ffn is what makes the parameter count the published 1.55B); it uses the 0.5B multipliers as
# stand-ins (their values do not change the work done).
SHAPES = {
    "0.5b": _hf_config(36, 1024, 8, 2, 64, 24, 64, 128, 1, 2048, 32784, False),
    "1.5b-deep": _hf_config(66, 1280, 6, 2, 128, 24, 64, 256, 1, 3072, 65536, True),
}
CASES = {  # name: (shape, sequence length, micro-batch size)
    "0.5b_s2048_b4": ("0.5b", 2048, 4),
    "0.5b_s4096_b2": ("0.5b", 4096, 2),
    "1.5b-deep_s4096_b1": ("1.5b-deep", 4096, 1),
}

# The local spec as a user without Transformer Engine runs it: unfused RoPE (upstream's fused
# RoPE is TE's). LOCAL_FUSED keeps RoPE fusion (the default), which without TE runs the
# Triton RoPE of patch 0038; with TE installed in the call, TE's.
LOCAL_FUSED = ["--transformer-impl", "local", "--no-persist-layer-norm"]
LOCAL = LOCAL_FUSED + ["--no-rope-fusion"]
TE = ["--transformer-impl", "transformer_engine"]
FULL_GRAPH = ["--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad"]
# Upstream's per-layer graphs: each layer's forward and backward captured on its own (the host
# still runs the schedule, embedding, loss and optimizer between them). They train like eager
# since patch 0042 (tests/unit_tests/ssm/test_per_layer_cuda_graphs.py, GPU). The NaN check is off
# as in FULL_GRAPH, so that the two graph modes differ only in what is captured.
LAYER_GRAPH = ["--cuda-graph-impl", "local", "--no-check-for-nan-in-loss-and-grad"]
# Upstream's CUDA graph of the optimizer step; a captured step needs tensor-valued gradient
# clipping: Transformer Engine's multi-tensor ops, or without TE the local fallbacks' capture
# path (patch 0045). The systems marked as needing TE below were defined before it.
OPT_GRAPH = ["--optimizer-cuda-graph"]
# Upstream's fused (torch.compile'd) vocabulary-parallel cross entropy: fewer passes over the
# fp32 logits (tokens x vocabulary). Its TE variant is disabled upstream.
CE_FUSION = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"]
# Mamba layers transpose the narrow hidden states instead of the wide in_proj / scan outputs.
BATCH_FIRST = ["--mamba-batch-first"]
# The launcher's optimizer (scripts/falcon_h1/train_falcon_h1.sh): is the optimizer graph as
# fast with it?
DIST_OPT = ["--use-distributed-optimizer"]
# PyTorch's fused AdamW instead of TE's FusedAdam (scripts/gpu/bench_adam.py: 4.1 vs 6.5 ms for
# this model's fp32 state, graph replays).
TORCH_ADAM = ["--use-torch-fused-adam"]
# Upstream's rerun state machine off (its default validate_results all-reduces a flag and reads
# it on the host every step). With the whole-iteration graph it has nothing to validate: the NaN
# check of the loss and gradients is off (FULL_GRAPH) and the spiky-loss check is off by default.
NO_RERUN = ["--rerun-mode", "disabled"]
# The language-model loss in two Triton passes over the bf16 logits (patch 0036): no fp32
# copies of the [tokens, vocabulary] logits (in the unfused path at 0.5B s2048 x 4: 5.2 ms of
# kernels per step, trace_long_kernels_te_graph_opt_bf.json, and a 1.1 GB fp32 copy).
TRITON_CE = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "triton"]
# Mamba layers keep the convolution output and scan intermediates for the backward instead of
# recomputing them (same bits; 3.24 ms of recompute kernels per 0.5B s2048 x 4 step in
# trace_kernels_te_graph_opt_bf_all.json; more activation memory).
KEEP_SSD = ["--mamba-keep-ssd-activations"]
# The path of a user without Transformer Engine: refused in a call where TE imports (the local
# spec's RoPE fusion would run TE's kernel instead of the Triton one).
WITHOUT_TE = {
    "ours_local_graph_bf", "ours_local_graph_bf_triton", "ours_local_layer_graph_bf_triton",
    "ours_local_graph_bf_tadam_norerun_tce", "ours_local_graph_bf_tadam_norerun_triton",
    "ours_local_graph_opt_bf_tadam_norerun_triton", "ours_local_bf_tadam_norerun_triton",
}  # fmt: skip
TE_PRESENT = "Transformer Engine importable here (the system measures the path without it)"
TE_MISSING = "Transformer Engine not importable here"
OURS = {  # name: (extra pretrain_mamba.py flags, needs Transformer Engine)
    "ours_local": (LOCAL, False),
    "ours_local_graph": (LOCAL + FULL_GRAPH, False),
    "ours_local_graph_opt": (LOCAL + FULL_GRAPH + OPT_GRAPH, True),
    "ours_te": (TE, True),
    "ours_te_graph": (TE + FULL_GRAPH, True),
    "ours_te_graph_opt": (TE + FULL_GRAPH + OPT_GRAPH, True),
    "ours_te_graph_opt_ce": (TE + FULL_GRAPH + OPT_GRAPH + CE_FUSION, True),
    "ours_te_bf": (TE + BATCH_FIRST, True),
    "ours_te_graph_opt_bf": (TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST, True),
    "ours_te_graph_opt_bf_dist": (TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + DIST_OPT, True),
    "ours_local_graph_opt_bf": (LOCAL + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST, True),
    "ours_te_graph_opt_bf_tadam": (TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM, True),
    "ours_te_graph_opt_bf_tadam_norerun": (
        TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN,
        True,
    ),
    "ours_te_graph_opt_bf_tadam_norerun_tce": (
        TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        True,
    ),
    "ours_te_graph_opt_bf_tadam_norerun_tce_keep": (
        TE + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE + KEEP_SSD,
        True,
    ),
    "ours_local_graph_opt_bf_tadam": (
        LOCAL + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM,
        True,
    ),
    "ours_local_graph_opt_bf_tadam_tce": (
        LOCAL + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + TRITON_CE,
        True,
    ),
    # Without TE (a TE=0 call): the local spec with whole-iteration graphs, unfused vs the Triton
    # RoPE and cross entropy.
    "ours_local_graph_bf": (LOCAL + FULL_GRAPH + BATCH_FIRST, False),
    "ours_local_graph_bf_triton": (LOCAL_FUSED + FULL_GRAPH + BATCH_FIRST + TRITON_CE, False),
    # The launcher's setting without TE (scripts/falcon_h1/train_falcon_h1.sh: unfused RoPE,
    # PyTorch's fused AdamW, rerun off, the Triton loss; the optimizer step stays outside the
    # graph), and the same with the Triton RoPE.
    "ours_local_graph_bf_tadam_norerun_tce": (
        LOCAL + FULL_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        False,
    ),
    "ours_local_graph_bf_tadam_norerun_triton": (
        LOCAL_FUSED + FULL_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        False,
    ),
    # The same with the optimizer step captured too (OPTIMIZER_GRAPH=1 of the launcher): without
    # TE, gradient clipping stays on the device under capture (patch 0045).
    "ours_local_graph_opt_bf_tadam_norerun_triton": (
        LOCAL_FUSED + FULL_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        False,
    ),
    # Per-layer graphs instead of the whole-iteration graph: the TE setting of the launchers,
    # and the no-TE one (a TE=0 call).
    "ours_te_layer_graph_opt_bf_tadam_norerun_tce": (
        TE + LAYER_GRAPH + OPT_GRAPH + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        True,
    ),
    "ours_local_layer_graph_bf_triton": (
        LOCAL_FUSED + LAYER_GRAPH + BATCH_FIRST + TRITON_CE,
        False,
    ),
    # Eager (no CUDA graph) with every other setting of the launchers, and with the Mamba
    # activations kept (the backward then skips mamba_ssm's forward recompute: fewer launches
    # on the host-bound eager step): the eager target of the throughput issue.
    "ours_te_bf_tadam_norerun_tce": (TE + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE, True),
    "ours_te_bf_tadam_norerun_tce_keep": (
        TE + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE + KEEP_SSD,
        True,
    ),
    # Eager with the local spec (the launcher's no-TE setting without graphs): the eager target
    # holds for either spec, and the local spec skips TE's per-call host work.
    "ours_local_bf_tadam_norerun_triton": (
        LOCAL_FUSED + BATCH_FIRST + TORCH_ADAM + NO_RERUN + TRITON_CE,
        False,
    ),
    "ours_bitnet": (LOCAL + ["--use-bitnet"], False),
    "ours_bitnet_graph": (LOCAL + FULL_GRAPH + ["--use-bitnet"], False),
    "ours_bitnet_graph_opt": (LOCAL + FULL_GRAPH + OPT_GRAPH + ["--use-bitnet"], True),
}
# hf_again: plain HF once more, listed last in --systems. HF's eager step is host-bound and its
# time moves between runs of one call too; with both runs the ratios are taken against the
# faster one (see reference_hf).
HF = {"hf": {}, "hf_compile": {"compile": True}, "hf_liger": {"liger": True}, "hf_again": {}}
SYSTEMS = list(HF) + list(OURS)

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def timing_plan(iters: int) -> tuple[int, int, int]:
    """(first timed step, last timed step, first profiled step); steps are 1-based.

    Timed: from step iters//3 + 2 (after the default 3 CUDA-graph warm-up steps and capture)
    to iters - 3; profiled: the last two steps.
    """
    if iters < 12:
        raise SystemExit("--iters must be >= 12 (warm-up, graph capture, timing, profile)")
    return iters // 3 + 2, iters - 3, iters - 1


def timed_windows(iters: int, log_interval: int) -> list[tuple[int, int]]:
    """The windows of ``log_interval`` steps (first, last; 1-based) whose mean step time counts:
    each ends at a log step (a multiple of the interval, where Megatron reports the window's
    mean) and lies within timing_plan's timed steps. At least two, or SystemExit."""
    first, last, _ = timing_plan(iters)
    windows = [
        (end - log_interval + 1, end)
        for end in range(log_interval, last + 1, log_interval)
        if end - log_interval + 1 >= first
    ]
    if len(windows) < 2:
        raise SystemExit(
            f"--iters {iters} with --log-interval {log_interval} leaves {len(windows)} timed "
            f"window(s) of {log_interval} steps between steps {first} and {last}; need 2: raise "
            "--iters (e.g. 5 x --log-interval) or lower --log-interval"
        )
    return windows


def window_ms(times: dict[int, float], windows: list[tuple[int, int]]) -> list[float]:
    """Mean step times (ms) of the timed ``windows``; ``times``: {log step: the mean step time of
    the window it ends}."""
    return [times[end] for _, end in windows]


# --------------------------------------------------------------------------------------------
# measurement helpers


def matmul_tflops() -> float:
    """bf16 8192^3 matmul rate on this GPU (median of 20 runs), the MFU denominator."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    from cuda_timing import median_ms

    return 2 * 8192**3 / (median_ms(lambda: a @ b, warmup=5, iters=20) / 1e3) / 1e12


def mamba_path(names: set[str]) -> str:
    """Which Mamba implementation ran, from the kernel names of a profile."""
    kernels = "mamba_ssm Triton SSD kernels" if any("chunk_scan" in n for n in names) else None
    conv = "causal_conv1d CUDA" if any("causal_conv1d" in n for n in names) else None
    found = [k for k in (kernels, conv) if k]
    return " + ".join(found) if found else "no mamba_ssm/causal_conv1d kernels (torch path)"


# Host events of a trace without Python stacks: what the host was in when the GPU went idle.
HOST_EVENTS = ("cpu_op", "user_annotation", "cuda_runtime")


def trace_summary(trace: dict) -> dict:
    busy = gpu_busy_fraction(trace)
    idle = idle_by_host_function(trace, prefix="", min_gap_us=20.0, categories=HOST_EVENTS)
    return {
        "gpu_busy": busy["busy_fraction"],
        "profiled_steps": busy["steps"],
        "kernels_per_step": busy["kernels"] / max(busy["steps"], 1),
        "mamba_path": mamba_path(kernel_names(trace)),
        "top_kernels": top_kernels(trace, 40),
        # GPU gaps of >= 20 us, charged to the innermost host op / annotation / CUDA runtime
        # call running at the gap's start (the 12 largest).
        "idle_gaps": dict(idle, by_function=idle["by_function"][:12]),
    }


# --------------------------------------------------------------------------------------------
# HF worker (runs in its own process)


def hf_worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(1234)
    from transformers import FalconH1Config, FalconH1ForCausalLM

    if spec.get("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_falcon_h1

        apply_liger_kernel_to_falcon_h1()
    config = FalconH1Config(**SHAPES[spec["shape"]])
    config._attn_implementation = "sdpa"
    model = FalconH1ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True
    )
    run = torch.compile(model) if spec.get("compile") else model
    seq, mbs, iters, interval = spec["seq"], spec["mbs"], spec["iters"], spec["log_interval"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    first, last, prof_start = timing_plan(iters)
    windows = timed_windows(iters, interval)

    def step() -> float:
        tokens = torch.randint(
            0, config.vocab_size, (mbs, seq), device="cuda", generator=generator
        )
        loss = run(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times, losses, pending, t0 = {}, [], [], None
    torch.cuda.reset_peak_memory_stats()
    trace_path = Path(spec["trace"])
    with torch.profiler.profile(
        schedule=torch.profiler.schedule(wait=prof_start - 2, warmup=1, active=2, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(str(trace_path)),
    ) as prof:
        for i in range(1, iters + 1):
            if t0 is None:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            pending.append(step().detach())
            if i % interval == 0 or i == iters:
                # Read the window's losses (a sync), as Megatron does at a log step.
                losses += [float(loss) for loss in pending]
                times[i] = (time.perf_counter() - t0) * 1e3 / len(pending)
                pending, t0 = [], None
            prof.step()
    return {
        "median_ms": statistics.median(window_ms(times, windows)),
        "timed_steps": [first, last],
        "timed_windows": windows,
        "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "losses": losses,
    }


# --------------------------------------------------------------------------------------------
# runs


def run_hf(
    name: str, case: str, iters: int, log_interval: int, out_dir: Path, keep: bool = False
) -> dict:
    shape, seq, mbs = CASES[case]
    trace = out_dir / f"trace_{case}_{name}.json"
    spec = dict(
        HF[name], shape=shape, seq=seq, mbs=mbs, iters=iters, log_interval=log_interval,
        trace=str(trace),
    )  # fmt: skip
    log = out_dir / f"{case}_{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--hf-worker", json.dumps(spec)],
            stdout=fh, stderr=subprocess.STDOUT, timeout=900,
        )  # fmt: skip
    text = log.read_text(errors="replace")
    match = re.search(r"^HF_RESULT (.*)$", text, re.M)
    if proc.returncode != 0 or not match:
        return {"error": "\n".join(text.splitlines()[-15:])}
    result = json.loads(match.group(1))
    data = load_trace(trace)
    result.update(trace_summary(data))
    if keep:
        result["trace"] = keep_trace(trace, data, out_dir, case, name)
    trace.unlink()
    return result


def megatron_flags(case: str) -> list[str]:
    from falcon_h1_config import megatron_model_flags, parse_hf_config

    shape, seq, mbs = CASES[case]
    config = SHAPES[shape]
    settings = parse_hf_config(config)
    flags = megatron_model_flags(settings, [config["num_hidden_layers"]])
    drop = {"--max-position-embeddings"}  # set to the sequence length below
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in drop:
            skip = True
            continue
        out.append(flag)
    return out + [
        "--vocab-size", str(config["vocab_size"]), "--seq-length", str(seq),
        "--max-position-embeddings", str(seq), "--micro-batch-size", str(mbs),
        "--global-batch-size", str(mbs),
    ]  # fmt: skip


def keep_trace(trace: Path, data: dict, out_dir: Path, case: str, name: str) -> str:
    """Gzip the profiler trace file ``trace`` (``data``: its loaded events) to
    ``out_dir/traces/trace_<case>_<name>.json.gz`` and write its host hotspots
    (``gpu_trace.host_hotspots``) beside it as ``...host.json``, small enough to bring back where
    the trace is not (a kept trace with Python stacks reaches ~20 MB); its path."""
    target = out_dir / "traces" / f"trace_{case}_{name}.json.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = trace.read_bytes()
    target.write_bytes(raw if trace.suffix == ".gz" else gzip.compress(raw, 6))
    hotspots = target.with_name(f"trace_{case}_{name}.host.json")
    hotspots.write_text(json.dumps(host_hotspots(data), indent=1) + "\n")
    return str(target.relative_to(out_dir))


def run_ours(
    name: str,
    case: str,
    iters: int,
    log_interval: int,
    megatron: Path,
    out_dir: Path,
    stacks: bool = False,
    keep: bool = False,
) -> dict:
    """One Megatron run; ``stacks``: the profiled steps also record Python call stacks (more
    host time in those two steps: their GPU-busy figure is then a lower bound); ``keep``: the
    trace is kept in ``out_dir/traces/``. The run's work folder (TensorBoard events, the raw
    profiler trace) is removed afterwards: what it measured is in the result and the log, and a
    device call brings back only so many files."""
    work = out_dir / f"work_{case}_{name}"
    try:
        extra, _ = OURS[name]
        first, last, prof_start = timing_plan(iters)
        windows = timed_windows(iters, log_interval)
        work.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "--master-port", "29555", str(megatron / "pretrain_mamba.py"),
            *megatron_flags(case), "--bf16", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--train-iters", str(iters), "--lr", str(LR), "--lr-decay-style", "constant",
            "--optimizer", "adam", "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]),
            "--weight-decay", str(WEIGHT_DECAY), "--clip-grad", str(CLIP), "--seed", "1234",
            "--log-interval", str(log_interval), "--eval-iters", "0", "--eval-interval", "100000",
            "--no-gradient-accumulation-fusion", "--no-create-attention-mask-in-dataloader",
            "--log-memory-to-tensorboard", "--tensorboard-log-interval", str(log_interval),
            "--tensorboard-dir", str(work / "tb"), "--profile", "--use-pytorch-profiler",
            "--profile-step-start", str(prof_start - 1), "--profile-step-end", str(prof_start + 1),
            *extra,
        ]  # fmt: skip
        if stacks:
            args += ["--pytorch-profiler-collect-callstack", "--pytorch-profiler-collect-shapes"]
        env = dict(os.environ, PYTHONPATH=f"{megatron}:{os.environ.get('PYTHONPATH', '')}")
        log = out_dir / f"{case}_{name}.log"
        with open(log, "w") as fh:
            fh.write(" ".join(args) + "\n")
            fh.flush()
            try:
                proc = subprocess.run(
                    args, cwd=megatron, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=900
                )
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        text = log.read_text(errors="replace")
        if code != 0:
            errors = [l for l in text.splitlines() if "Error" in l or "error" in l]
            return {"error": f"exit {code}: " + " | ".join(errors[-3:])[-1500:]}
        times = megatron_log_times(text)
        losses = [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", text)]
        peak = [float(v) for v in re.findall(r"max allocated: ([0-9.]+)", text)]
        missing = [end for _, end in windows if end not in times]
        if missing:
            return {"error": f"no 'elapsed time per iteration' logged at iterations {missing}"}
        result = {
            "median_ms": statistics.median(window_ms(times, windows)),
            "timed_steps": [first, last],
            "timed_windows": windows,
            "peak_allocated_mb": max(peak) if peak else None,
            "losses": losses,
        }
        traces = sorted((work / "torch_profile").glob("rank-0.json*"))
        if traces:
            data = load_trace(traces[0])
            result.update(trace_summary(data))
            if keep:
                result["trace"] = keep_trace(traces[0], data, out_dir, case, name)
                result["trace_has_stacks"] = stacks
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def megatron_log_times(text: str) -> dict[int, float]:
    """{iteration: 'elapsed time per iteration (ms)'} of Megatron's log lines: at a log step, the
    mean step time of the window of --log-interval steps that it ends."""
    return {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(
            r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)", text
        )
    }


def resumable(path: Optional[Path], report: dict) -> dict:
    """``{case: {system: result}}`` of the successful runs of an earlier call, if it measured the
    same clean commit with the same matmul-rate denominator's device (else nothing is reused)."""
    if path is None:
        return {}
    earlier = json.loads(path.read_text())
    same_code = earlier.get("commit") == report["commit"] and earlier.get("dirty") is False
    # Files without a timing plan were timed per step (log interval 1).
    same_plan = earlier.get("iters") == report.get("iters") and earlier.get(
        "log_interval", 1
    ) == report.get("log_interval", 1)
    if (
        not same_code
        or not same_plan
        or report.get("dirty") is not False
        or earlier.get("device") != report.get("device")
    ):
        print(f"--resume {path}: other or dirty code, timing plan or device: nothing reused")
        return {}
    return {
        case: {n: r for n, r in entry["systems"].items() if "error" not in r}
        for case, entry in earlier.get("cases", {}).items()
    }


def te_refusal(name: str, have_te: bool) -> Optional[str]:
    """Why Megatron system ``name`` cannot run where TE is (``have_te``) or is not importable,
    or None: TE systems need it, the no-TE ones (WITHOUT_TE) need it absent."""
    if OURS[name][1] and not have_te:
        return TE_MISSING
    if name in WITHOUT_TE and have_te:
        return TE_PRESENT
    return None


def te_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True
    )
    return probe.returncode == 0


def markdown(report: dict) -> str:
    lines = [
        "# Falcon-H1 training step: HF transformers vs falcon-mcore (pretrain_mamba.py)",
        "",
        f"- device: {report['device']}; date (UTC): {report['date_utc']}; commit "
        f"{report['commit']}{' (dirty tree)' if report.get('dirty') else ''}",
        f"- versions: {json.dumps(report['versions'])}",
        f"- command: `{report['command']}`",
        f"- timing: {report.get('iters', 16)} steps per run; step time = median over windows "
        f"of {report.get('log_interval', 1)} step(s) (Megatron's --log-interval; one GPU read "
        "per window on both sides)",
        f"- bf16 matmul rate measured in this job: {report['matmul_tflops']:.0f} TFLOP/s "
        "(MFU denominator); FLOPs/token: scripts/falcon_h1/flops.py",
        "",
    ]
    for case, entry in report["cases"].items():
        lines += [
            f"## {case} ({entry['tokens_per_step']} tokens/step, "
            f"{entry['flops_per_token'] / 1e9:.3f} GFLOP/token)",
            "",
            "| system | step ms | tokens/s | x HF | MFU | GPU busy | peak MB | kernels/step | "
            "Mamba path |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in entry["systems"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:200]} | | | | | | | |")
                continue
            busy = r.get("gpu_busy")
            lines.append(
                f"| {name} | {r['median_ms']:.1f} | {r['tok_s']:.0f} | "
                f"{r.get('over_hf', float('nan')):.3f} | {r['mfu']:.1%} | "
                f"{'n/a' if busy is None else f'{busy:.1%}'} | {r['peak_allocated_mb']:.0f} | "
                f"{r.get('kernels_per_step', 0):.0f} | {r.get('mamba_path', 'n/a')} |"
            )
        if "hf_again" in entry["systems"] and "hf_reference" in entry:
            lines += ["", f"x HF: against {entry['hf_reference']}, the faster plain HF run that "
                      "finished in this call"]  # fmt: skip
        if entry.get("loss_max_rel_diff"):
            diffs = "; ".join(
                f"{name} {'n/a (other window count)' if d is None else f'{d:.1e}'}"
                for name, d in entry["loss_max_rel_diff"].items()
            )
            lines += ["", f"Loss curves vs {entry['loss_reference']} (max relative difference of "
                      f"the logged window means): {diffs}"]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def max_rel_diff(reference: list[float], other: list[float]) -> float | None:
    """Largest ``|other - reference| / |reference|`` over two loss curves of the same
    length (None when the lengths differ: the curves do not describe the same steps)."""
    if len(reference) != len(other) or not reference:
        return None
    return max(abs(b - a) / abs(a) for a, b in zip(reference, other))


def reference_hf(systems: dict) -> tuple[str, dict]:
    """The plain HF run that ratios are taken against: ``hf``, or ``hf_again`` where it ran in
    the same call and was faster (the conservative ratio)."""
    hf, again = systems.get("hf", {}), systems.get("hf_again", {})
    if (
        "tok_s" in hf
        and "tok_s" in again
        and "error" not in again
        and again.get("call") == hf.get("call")
        and again["tok_s"] > hf["tok_s"]
    ):
        return "hf_again", again
    return "hf", hf


def compare(entry: dict) -> None:
    """Ratios to HF and the best of ours, between runs of the same call only (partial results
    too: a job stopped by its time limit still reports them)."""
    hf_name, hf = reference_hf(entry["systems"])
    for name, r in entry["systems"].items():
        same_call = r.get("call") == hf.get("call")
        if "error" not in r and "error" not in hf and "tok_s" in hf and same_call:
            r["over_hf"] = r["tok_s"] / hf["tok_s"]
    ours = {
        n: r
        for n, r in entry["systems"].items()
        if n in OURS and "error" not in r and r.get("call") == hf.get("call")
    }
    if ours:
        best = max(ours, key=lambda n: ours[n]["tok_s"])
        entry.update(
            best_ours=best, ours_tok_s=ours[best]["tok_s"], mfu_ours=ours[best]["mfu"],
            gpu_busy_ours=ours[best].get("gpu_busy"),
        )  # fmt: skip
    if "tok_s" in hf:
        entry.update(hf_reference=hf_name, hf_tok_s=hf["tok_s"], mfu_hf=hf["mfu"])
    if "ours_tok_s" in entry and "hf_tok_s" in entry:
        entry["ours_over_hf"] = entry["ours_tok_s"] / entry["hf_tok_s"]
    # Our runs start from the same seed on the same tokens and differ only in how they compute
    # (graphs, kernels, layouts): their loss curves, against the first of ours in this call.
    ran = [
        n for n, r in entry["systems"].items() if n in OURS and "error" not in r and r.get("losses")
    ]  # fmt: skip
    if ran:
        call = entry["systems"][ran[0]].get("call")
        ran = [n for n in ran if entry["systems"][n].get("call") == call]
    if len(ran) > 1:
        reference = entry["systems"][ran[0]]["losses"]
        entry["loss_reference"] = ran[0]
        entry["loss_max_rel_diff"] = {
            n: max_rel_diff(reference, entry["systems"][n]["losses"]) for n in ran[1:]
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--megatron", type=Path, default=ROOT / "build" / "Megatron-LM")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--log-interval",
        type=int,
        default=10,
        help="steps per timing window: Megatron's --log-interval (the launchers use 10; it logs, "
        "and reads the GPU, once per window) and the steps between HF's loss reads",
    )
    parser.add_argument("--name", default="bench_falcon_h1", help="output file stem")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="start no new run after this many seconds (0: no limit); results so far are kept",
    )
    parser.add_argument(
        "--keep-traces",
        default="",
        help="comma-separated systems whose profiler traces (with Python call stacks for ours) "
        "are kept as OUT_DIR/traces/*.json.gz, with their host hotspots in *.host.json",
    )
    parser.add_argument(
        "--keep-plain-traces",
        default="",
        help="comma-separated systems of ours whose profiler traces are kept without Python "
        "call stacks (their GPU-busy figure stays exact; about 1 MB each)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        help="a JSON of an earlier call at the same clean commit: its successful runs are kept",
    )
    args = parser.parse_args()
    if args.hf_worker:
        print("HF_RESULT " + json.dumps(hf_worker(json.loads(args.hf_worker))), flush=True)
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required")
    cases = [c for c in args.cases.split(",") if c]
    systems = [s for s in args.systems.split(",") if s]
    for c in cases:
        if c not in CASES:
            parser.error(f"--cases: unknown {c!r}; choose from {', '.join(CASES)}")
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"--systems: unknown {s!r}; choose from {', '.join(SYSTEMS)}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1, got {args.log_interval}")
    timed_windows(args.iters, args.log_interval)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.megatron = args.megatron.resolve()
    use("megatron", megatron=args.megatron)  # the converter's mapping reads Megatron's table

    from provenance import provenance

    started = time.time()
    report = provenance([sys.executable, *sys.argv])
    report.update(
        benchmark="falcon_h1_training_step",
        iters=args.iters,
        log_interval=args.log_interval,
        matmul_tflops=matmul_tflops(),
        cases={},
    )
    earlier = resumable(args.resume, report)
    have_te = te_available()
    report["transformer_engine_importable"] = have_te
    out_json = args.out_dir / f"{args.name}.json"
    for case in cases:
        shape, seq, mbs = CASES[case]
        dims = FalconH1Dims.from_hf_config(SHAPES[shape])
        flops = training_flops_per_token(dims, seq)
        entry = {
            "shape": shape, "seq_len": seq, "micro_batch": mbs, "tokens_per_step": seq * mbs,
            "flops_per_token": flops["total"], "flops_terms": flops, "systems": {},
        }  # fmt: skip
        report["cases"][case] = entry
        for name in systems:
            done = earlier.get(case, {}).get(name)
            if done is not None:
                entry["systems"][name] = dict(done, resumed_from=str(args.resume))
                continue
            t0 = time.time()
            if args.deadline_s and t0 - started > args.deadline_s:
                entry["systems"][name] = {"error": "not run: --deadline-s reached"}
                continue
            keep = name in args.keep_traces.split(",")
            plain = name in args.keep_plain_traces.split(",")
            if name in HF:
                r = run_hf(name, case, args.iters, args.log_interval, args.out_dir, keep)
            elif te_refusal(name, have_te):
                r = {"error": te_refusal(name, have_te)}
            else:
                r = run_ours(
                    name, case, args.iters, args.log_interval, args.megatron, args.out_dir,
                    stacks=keep, keep=keep or plain,
                )  # fmt: skip
            r["wall_s"] = round(time.time() - t0, 1)
            r["call"] = report["date_utc"]  # ratios only between runs of one call
            if "error" not in r:
                r["tok_s"] = seq * mbs / (r["median_ms"] / 1e3)
                r["mfu"] = r["tok_s"] * flops["total"] / (report["matmul_tflops"] * 1e12)
            entry["systems"][name] = r
            print(f"[{case}] {name}: " + json.dumps(
                {k: v for k, v in r.items() if k not in ("losses", "top_kernels")}
            ), flush=True)  # fmt: skip
            # Partial results survive a killed job.
            compare(entry)
            out_json.write_text(json.dumps(report, indent=1) + "\n")
            (args.out_dir / f"{args.name}.md").write_text(markdown(report) + "\n")
        compare(entry)
        out_json.write_text(json.dumps(report, indent=1) + "\n")
    runs = [r for entry in report["cases"].values() for r in entry["systems"].values()]
    skipped = ("not run: --deadline-s reached", TE_MISSING, TE_PRESENT)
    failed = [r for r in runs if "error" in r and r["error"] not in skipped]
    report["summary"] = {
        "n_checks": len(runs),
        "n_passed": sum("error" not in r for r in runs),
        "n_failed": len(failed),
        "n_skipped": sum(r.get("error") in skipped for r in runs),
    }
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
