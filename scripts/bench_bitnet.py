#!/usr/bin/env python3
# Copyright (c) 2026, falcon-mcore authors. All rights reserved.
"""Per-linear fwd+bwd benchmark: bf16 vs our BitNet linear vs the "PR #3002 method".

Cases (all bf16 activations/weights, one GPU, ``--tokens`` rows):

* ``bf16``          -- ``torch.nn.functional.linear`` forward + autograd backward (cuBLAS).
* ``pr3002``        -- re-implementation of the algorithm of Megatron-LM PR #3002
                       (refs/pull/3002/head): per-token absmax activation quant and per-tensor
                       absmean ternary weight quant as torch ops, detach-STE
                       (``x + (q(x) - x).detach()``), then a bf16 matmul of the dequantised
                       values; the weight is re-quantised on every call.
* ``bitnet``        -- ``megatron.core.bitnet.bitnet_linear`` with the weight cache (weight
                       quantised once, as within one optimizer step's micro-batches).
* ``bitnet_nocache``-- the same, re-quantising the weight on every call (upper bound: one
                       micro-batch per step).
* ``bitnet_mg``     -- cached, with gradient-accumulation fusion into an fp32 ``main_grad``
                       (Megatron's configuration).
* ``torchao``       -- the peer: torchao's BitNet b1.58 training linear
                       (``torchao.prototype.quantized_training.bitnet_training``): the same
                       quantisers (checked against ours on CPU in tests/test_bench_bitnet.py),
                       re-quantising the weight on every call, INT8 tensor-core GEMM forward,
                       bf16 backward. Skipped, and recorded as skipped, where torchao does not
                       import.

Shapes (Llama-3-8B-like layer): qkv 4096->6144, proj 4096->4096, fc1 4096->28672,
fc2 14336->4096; "layer" is the sum of the four.  Timing: CUDA events around fwd+bwd, after
warm-up (which includes Triton autotuning), median of ``--iters``; peak memory per case is
``max_memory_allocated`` during one fwd+bwd minus the memory allocated before it.

Writes ``bench_bitnet.json`` and ``bench_bitnet.md`` (device, date, versions, exact command)
into ``--out-dir``.

Usage::

    python scripts/bench_bitnet.py --out-dir results/bench_bitnet [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from project_paths import use  # noqa: E402
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)

SHAPES = {  # name: (in_features K, out_features N)
    "qkv": (4096, 6144),
    "proj": (4096, 4096),
    "fc1": (4096, 28672),
    "fc2": (14336, 4096),
}
ALL_CASES = ["bf16", "pr3002", "bitnet", "bitnet_nocache", "bitnet_mg", "torchao"]
# Variants of the cached BitNet case: the bf16 beta*T input-gradient operand kept in the weight
# cache for the whole step (dgrad="cublas_cached", --bitnet-dgrad) instead of dequantised per
# backward, and the backward GEMMs on our Triton kernels instead of cuBLAS (how the defaults of
# --bitnet-dgrad / --bitnet-wgrad were chosen); not run unless named in --cases.
EXTRA_CASES = [
    "bitnet_dgrad_cached",
    "bitnet_dgrad_triton",
    "bitnet_wgrad_triton",
    "bitnet_both_triton",
]


def _import_bitnet():
    try:
        return importlib.import_module("megatron.core.bitnet")
    except ImportError:
        use("overlay")
        importlib.invalidate_caches()
        return importlib.import_module("megatron.core.bitnet")


def torchao_bitnet_weight(weight):
    """``weight`` (out x in) as the parameter of torchao's BitNet b1.58 training linear: what
    ``quantize_(linear, bitnet_training())`` puts into an ``nn.Linear``; ``F.linear(x, w, None)``
    on it runs torchao's quantised forward and backward. Raises ImportError without torchao."""
    import torch
    from torchao.prototype.quantized_training import bitnet_training
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, bitnet_training())
    return linear.weight


def _storage_ptr(tensor) -> int:
    """Data pointer of a plain tensor or of the tensor a torchao wrapper parameter holds."""
    inner = getattr(tensor, "_data", None)
    return tensor.data_ptr() if inner is None else inner.data_ptr()


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    p.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help="comma list of " + ",".join(ALL_CASES + EXTRA_CASES),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="5 iters, 2 warm-up, no autotuning (BITNET_TRITON_AUTOTUNE=0): a smoke run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-prefill",
        action="store_true",
        help="do not keep the GPU busy (torch.cuda._sleep) while the host issues each timed "
        "step; then host-side launch overhead is included in the GPU time",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="write torch.profiler per-kernel CUDA time tables (profile.txt) for each case",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each component kernel per shape (triton.testing.do_bench, median)",
    )
    return p.parse_args()


# --------------------------------------------------------------------------------------------
# "PR #3002 method": our own re-implementation of its algorithm with torch ops.
# --------------------------------------------------------------------------------------------


def _pr3002_act_quant(x):
    """Per-token absmax int8 fake-quant (scale = 127 / max|x|, clamp 1e-5), returns x's dtype."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)


def _pr3002_weight_quant(w):
    """Per-tensor absmean ternary fake-quant (scale = 1 / mean|w|, clamp 1e-5)."""
    wf = w.float()
    scale = 1.0 / wf.abs().mean().clamp(min=1e-5)
    return ((wf * scale).round().clamp(-1, 1) / scale).to(w.dtype)


def pr3002_linear(x, w):
    """Detach-STE on both operands, then a bf16 linear of the dequantised values."""
    import torch.nn.functional as F

    x_q = x + (_pr3002_act_quant(x) - x).detach()
    w_q = w + (_pr3002_weight_quant(w) - w).detach()
    return F.linear(x_q, w_q)


def component_breakdown(shapes, m, dev):
    """Median time (ms) of each building block for every shape (kernel-level view)."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from megatron.core.bitnet import functional as BF
    from megatron.core.bitnet import triton_kernels as tk

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    out = {}
    for sname in shapes:
        k, n = SHAPES[sname]
        dt = torch.bfloat16
        x = (torch.randn(m, k, device=dev) * 2).to(dt)
        w = (torch.randn(n, k, device=dev) * 0.02).to(dt)
        dy = torch.randn(m, n, device=dev).to(dt)
        q, g, s = tk.act_quant(x)
        wq = BF.quantize_weight(w, dense_dtype=dt)
        mg = torch.zeros(n, k, device=dev)
        hit_cache = BF.BitNetWeightCache()
        BF.get_quantized_weight(w, cache=hit_cache, dense_dtype=dt)
        r = {
            "bf16_fwd_gemm": bench(lambda: F.linear(x, w)),
            "bf16_dgrad_gemm": bench(lambda: dy @ w),
            "bf16_wgrad_gemm": bench(lambda: dy.t() @ x),
            "act_quant": bench(lambda: tk.act_quant(x)),
            "weight_quant": bench(lambda: BF.quantize_weight(w)),
            "weight_quant_with_dense": bench(lambda: BF.quantize_weight(w, dense_dtype=dt)),
            "int8_fwd_gemm_triton": bench(lambda: tk.bitnet_fwd(q, s, wq.t, wq.beta, dt)),
            "int8_int_mm_cublas_noscale": bench(lambda: torch._int_mm(q, wq.t.t())),
            "dgrad_triton": bench(lambda: tk.bitnet_dgrad(dy, wq.t, wq.beta)),
            "dgrad_cublas_dense": bench(lambda: dy @ wq.dense),
            "weight_dequant": bench(lambda: tk.weight_dequant(wq.t, wq.beta, dt)),
            "dgrad_cublas_transient": bench(lambda: dy @ tk.weight_dequant(wq.t, wq.beta, dt)),
            "wgrad_triton": bench(lambda: tk.bitnet_wgrad(dy, q, s)),
            "wgrad_triton_main_grad": bench(lambda: tk.bitnet_wgrad(dy, q, s, main_grad=mg)),
            "act_dequant": bench(lambda: tk.act_dequant(q, s, dt)),
        }
        xq = tk.act_dequant(q, s, dt)
        r["wgrad_cublas_on_dequant"] = bench(lambda: dy.t() @ xq)
        try:
            torch.addmm(mg, dy.t(), xq, out_dtype=torch.float32)
            r["wgrad_cublas_addmm_fp32_out"] = bench(
                lambda: torch.addmm(mg, dy.t(), xq, out_dtype=torch.float32)
            )
            r["wgrad_cublas_addmm_fp32_inplace"] = bench(
                lambda: torch.addmm(mg, dy.t(), xq, out_dtype=torch.float32, out=mg)
            )
        except (TypeError, RuntimeError) as exc:
            r["wgrad_cublas_addmm_fp32_out"] = f"unsupported: {exc!r}"[:200]
        r["wgrad_cublas_then_add_main_grad"] = bench(lambda: mg.add_(dy.t() @ xq))

        # host-side cost of issuing each op (launch overhead), GPU kept busy meanwhile
        def host_us(fn, reps=50):
            torch.cuda.synchronize()
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(int(2e8))
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            dt_us = (time.perf_counter() - t0) / reps * 1e6
            torch.cuda.synchronize()
            return dt_us

        xr = x.detach().requires_grad_(True)
        wp = torch.nn.Parameter(w.detach().clone())
        lin_cache = BF.BitNetWeightCache()
        r["host_us"] = {
            "bitnet_linear_fwd": host_us(lambda: BF.bitnet_linear(xr, wp, weight_cache=lin_cache)),
            "bitnet_linear_fwd_bwd": host_us(
                lambda: BF.bitnet_linear(xr, wp, weight_cache=lin_cache).backward(dy), reps=20
            ),
            "bf16_linear_fwd_bwd": host_us(lambda: F.linear(xr, wp).backward(dy), reps=20),
            "torch_mm": host_us(lambda: dy @ w),
            "act_quant": host_us(lambda: tk.act_quant(x)),
            "int8_fwd_gemm_triton": host_us(lambda: tk.bitnet_fwd(q, s, wq.t, wq.beta, dt)),
            "act_dequant": host_us(lambda: tk.act_dequant(q, s, dt)),
            "scale_div": host_us(lambda: g / 127.0),  # one small torch op, for comparison
            "get_quantized_weight_hit": host_us(
                lambda: BF.get_quantized_weight(w, cache=hit_cache, dense_dtype=dt)
            ),
        }
        # where the host time of one fwd+bwd goes: wrap the functional building blocks
        acc_us = {}
        names = [
            "resolve_backend",
            "get_quantized_weight",
            "quantize_activation",
            "bitnet_matmul",
            "bitnet_input_grad",
            "bitnet_weight_grad",
        ]
        originals = {nm: getattr(BF, nm) for nm in names}

        def wrap(nm, fn):
            def inner(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    acc_us[nm] = acc_us.get(nm, 0.0) + (time.perf_counter() - t0) * 1e6

            return inner

        orig_fwd = BF.BitNetLinearFunction.forward
        orig_bwd = BF.BitNetLinearFunction.backward
        try:
            for nm in names:
                setattr(BF, nm, wrap(nm, originals[nm]))
            BF.BitNetLinearFunction.forward = staticmethod(wrap("Function.forward", orig_fwd))
            BF.BitNetLinearFunction.backward = staticmethod(wrap("Function.backward", orig_bwd))
            reps = 10
            tot = host_us(
                lambda: BF.bitnet_linear(xr, wp, weight_cache=lin_cache).backward(dy), reps=reps
            )
        finally:
            for nm in names:
                setattr(BF, nm, originals[nm])
            BF.BitNetLinearFunction.forward = staticmethod(orig_fwd)
            BF.BitNetLinearFunction.backward = staticmethod(orig_bwd)
        r["host_us_split"] = {"total": tot, **{kk: v / reps for kk, v in acc_us.items()}}
        out[sname] = r
        print(
            sname,
            {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()},
            flush=True,
        )
        del x, w, dy, q, g, s, wq, mg, xq
        torch.cuda.empty_cache()
    for name in ("_fwd_tuned", "_dgrad_tuned", "_wgrad_tuned"):
        tuner = getattr(tk, name, None)
        cache = getattr(tuner, "cache", {}) if tuner is not None else {}
        out.setdefault("autotune_choices", {})[name] = {str(kk): str(v) for kk, v in cache.items()}
    print("autotune choices:", json.dumps(out["autotune_choices"], indent=1), flush=True)
    return out


# --------------------------------------------------------------------------------------------


def main() -> int:
    args = _parse()
    if args.quick:
        os.environ["BITNET_TRITON_AUTOTUNE"] = "0"
        args.iters = min(args.iters, 5)
        args.warmup = min(args.warmup, 2)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("ERROR: no CUDA device visible; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    _import_bitnet()
    from megatron.core.bitnet import functional as BF

    if not BF.triton_available():
        print(
            f"ERROR: Triton kernels failed to import: {BF._TRITON_IMPORT_ERROR!r}", file=sys.stderr
        )
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {list(SHAPES)}")
    for c in cases:
        if c not in ALL_CASES + EXTRA_CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {ALL_CASES + EXTRA_CASES}")
    skipped_cases = {}
    if "torchao" in cases:
        try:
            importlib.import_module("torchao.prototype.quantized_training")
        except ImportError as err:
            skipped_cases["torchao"] = f"torchao does not import: {err}"
            cases.remove("torchao")
            print(f"NOTE: case torchao skipped ({skipped_cases['torchao']})", flush=True)

    dev = torch.device("cuda")
    dt = torch.bfloat16
    torch.manual_seed(args.seed)
    m = args.tokens

    def make_step(case, x, w, dy):
        cache = BF.BitNetWeightCache()
        if case == "bf16":
            return (lambda: F.linear(x, w).backward(dy)), None
        if case == "torchao":  # w is torchao's weight (torchao_bitnet_weight); None: its bias
            return (lambda: F.linear(x, w, None).backward(dy)), None
        if case == "pr3002":
            return (lambda: pr3002_linear(x, w).backward(dy)), None
        if case == "bitnet":
            return (lambda: BF.bitnet_linear(x, w, weight_cache=cache).backward(dy)), cache
        if case == "bitnet_nocache":
            return (lambda: BF.bitnet_linear(x, w).backward(dy)), None
        if case in EXTRA_CASES:
            gemms = {
                "bitnet_dgrad_cached": {"dgrad": "cublas_cached"},
                "bitnet_dgrad_triton": {"dgrad": "triton"},
                "bitnet_wgrad_triton": {"wgrad": "triton"},
                "bitnet_both_triton": {"dgrad": "triton", "wgrad": "triton"},
            }[case]
            return (lambda: BF.bitnet_linear(x, w, weight_cache=cache, **gemms).backward(dy)), cache
        if case == "bitnet_mg":
            w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=dev)
            return (
                lambda: BF.bitnet_linear(
                    x, w, weight_cache=cache, gradient_accumulation_fusion=True
                ).backward(dy)
            ), cache
        raise ValueError(case)

    def saved_per_microbatch_mib(step, w, cache):
        """MiB of tensors autograd saves for backward in one step, excluding the parameter and
        the per-step weight cache (what each in-flight micro-batch keeps alive)."""
        persistent = {_storage_ptr(w)}
        v = getattr(cache, "_value", None)
        if v is not None:
            persistent |= {t.data_ptr() for t in (v.t, v.beta, v.dense) if t is not None}
        seen = {}

        def pack(t):
            if t.data_ptr() not in persistent:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        return sum(seen.values()) / 2**20

    def cache_mib(cache):
        v = getattr(cache, "_value", None)
        if v is None:
            return 0.0
        tensors = [v.t, v.dense]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20

    prefill = not args.no_prefill and hasattr(torch.cuda, "_sleep")
    # ~4 ms of sleep at H100 clocks: longer than the host needs to issue one step
    prefill_cycles = int(8e6)
    profile_text = []
    results = {}
    for sname in shapes:
        k, n = SHAPES[sname]
        results[sname] = {}
        states = {}
        for case in cases:  # build, warm up (incl. autotuning) and measure memory per case
            x = (torch.randn(m, k, device=dev) * 2).to(dt).requires_grad_(True)
            w = torch.nn.Parameter((torch.randn(n, k, device=dev) * 0.02).to(dt))
            if case == "torchao":
                w = torchao_bitnet_weight(w.detach())
            dy = torch.randn(m, n, device=dev).to(dt)
            step, cache = make_step(case, x, w, dy)

            def clear(x=x, w=w):
                x.grad = None
                w.grad = None

            for _ in range(args.warmup):
                clear()
                step()
            clear()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            saved = saved_per_microbatch_mib(step, w, cache)
            clear()
            states[case] = (x, w, dy, step, clear, peak, cache_mib(cache), saved)
        # timed iterations, cases interleaved (rotating order) so that clock/thermal drift
        # affects all cases alike.  Unless --no-prefill, the GPU is kept busy by a sleep kernel
        # while the host issues the step (as earlier layers do in a real training step), so
        # the events measure GPU time, not host launch latency.
        times = {c: [] for c in cases}
        host = {c: [] for c in cases}
        for it in range(args.iters):
            r = it % len(cases)
            for case in cases[r:] + cases[:r]:
                _, _, _, step, clear, _, _, _ = states[case]
                clear()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                if prefill:
                    torch.cuda._sleep(prefill_cycles)
                start.record()
                t0 = time.perf_counter()
                step()
                host[case].append((time.perf_counter() - t0) * 1e3)
                end.record()
                end.synchronize()
                times[case].append(start.elapsed_time(end))
        for case in cases:
            ts = times[case]
            med = statistics.median(ts)
            hmed = statistics.median(host[case])
            peak, cmib, saved = states[case][5], states[case][6], states[case][7]
            results[sname][case] = {
                "median_ms": med,
                "min_ms": min(ts),
                "max_ms": max(ts),
                "host_issue_ms": hmed,
                "peak_extra_mib": peak / 2**20,
                "weight_cache_mib": cmib,
                "saved_for_backward_mib": saved,
                "tflops": 3 * 2 * m * n * k / (med * 1e-3) / 1e12,
            }
            print(
                f"{sname:5s} {case:20s} {med:8.3f} ms  (min {min(ts):.3f}, max {max(ts):.3f})  "
                f"host {hmed:6.3f} ms  peak+{peak / 2**20:8.1f} MiB  cache {cmib:7.1f} MiB  "
                f"saved {saved:7.1f} MiB",
                flush=True,
            )
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for case in cases:
                step, clear = states[case][3], states[case][4]
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        clear()
                        step()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
                profile_text.append(f"===== {sname} / {case} (3 steps) =====\n{table}\n")
        del states
        torch.cuda.empty_cache()

    breakdown = component_breakdown(shapes, m, dev) if args.breakdown else None

    layer = {}
    if all(s in shapes for s in SHAPES):
        for case in cases:
            layer[case] = {
                "median_ms": sum(results[s][case]["median_ms"] for s in SHAPES),
                "peak_extra_mib_max": max(results[s][case]["peak_extra_mib"] for s in SHAPES),
            }
    base_case = "bf16" if "bf16" in cases else None

    def ratio(sname_or_layer, case):
        table = layer if sname_or_layer == "layer" else results[sname_or_layer]
        if base_case is None:
            return None
        return table[case]["median_ms"] / table[base_case]["median_ms"]

    report = {
        "script": "scripts/bench_bitnet.py",
        **provenance(sys.argv),
        "capability": list(torch.cuda.get_device_capability(0)),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("BITNET_", "TRITON_"))},
        "tokens": m,
        "timing": "cuda events, cases interleaved, "
        + ("GPU queue prefilled with a sleep kernel" if prefill else "no prefill"),
        "iters": args.iters,
        "warmup": args.warmup,
        "quick": args.quick,
        "shapes": {s: {"in": SHAPES[s][0], "out": SHAPES[s][1]} for s in shapes},
        "results": results,
        "skipped_cases": skipped_cases,
        "layer": layer,
        "breakdown_ms": breakdown,
        "ratios_vs_bf16": {
            s: {c: ratio(s, c) for c in cases} for s in (shapes + (["layer"] if layer else []))
        },
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_bitnet.json").write_text(json.dumps(report, indent=2))

    lines = [
        "# BitNet linear benchmark (fwd+bwd, median)",
        "",
        f"- device: {report['device']} (sm_{''.join(map(str, report['capability']))})",
        f"- date (UTC): {report['date_utc']}",
        f"- commit: {report['commit']} (dirty: {report['dirty']})",
        f"- versions: python {report['versions']['python']}, torch {report['versions']['torch']}, "
        f"CUDA {report['versions']['cuda']}, triton {report['versions']['triton']}",
        f"- command: `{report['command']}`",
        f"- env: `{report['env']}`",
        f"- tokens {m}, warm-up {args.warmup}, iters {args.iters}"
        + (" (QUICK)" if args.quick else ""),
        f"- timing: {report['timing']}; median of iters",
        *(f"- skipped: {c}: {why}" for c, why in skipped_cases.items()),
        "",
        "| shape | "
        + " | ".join(f"{c} ms" for c in cases)
        + " | "
        + " | ".join(f"{c}/bf16" for c in cases if c != "bf16")
        + " |",
        "|---|" + "---:|" * (len(cases) + len([c for c in cases if c != "bf16"])),
    ]
    rows = shapes + (["layer"] if layer else [])
    for s in rows:
        table = layer if s == "layer" else results[s]
        cells = [f"{table[c]['median_ms']:.3f}" for c in cases]
        rats = [f"{ratio(s, c):.3f}" if base_case else "-" for c in cases if c != "bf16"]
        name = s if s == "layer" else f"{s} {SHAPES[s][0]}->{SHAPES[s][1]}"
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(rats) + " |")
    lines += [
        "",
        "Peak extra memory of one fwd+bwd (MiB; the cached quantised weight, allocated once per"
        " optimizer step, is listed after the slash where present):",
        "",
        "| shape | " + " | ".join(cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for s in shapes:
        lines.append(
            f"| {s} | "
            + " | ".join(
                f"{results[s][c]['peak_extra_mib']:.0f}"
                + (
                    f" / {results[s][c]['weight_cache_mib']:.0f}"
                    if results[s][c]["weight_cache_mib"]
                    else ""
                )
                for c in cases
            )
            + " |"
        )
    lines += [
        "",
        "Saved for backward per micro-batch (MiB; excludes the parameter and the per-step"
        " weight cache):",
        "",
        "| shape | " + " | ".join(cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for s in shapes:
        lines.append(
            f"| {s} | "
            + " | ".join(f"{results[s][c]['saved_for_backward_mib']:.0f}" for c in cases)
            + " |"
        )
    lines += [
        "",
        "Host time to issue one fwd+bwd step (ms, median; Python + launch overhead):",
        "",
        "| shape | " + " | ".join(cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for s in shapes:
        lines.append(
            f"| {s} | " + " | ".join(f"{results[s][c]['host_issue_ms']:.3f}" for c in cases) + " |"
        )
    (out_dir / "bench_bitnet.md").write_text("\n".join(lines) + "\n")
    if profile_text:
        (out_dir / "profile.txt").write_text("\n".join(profile_text))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
