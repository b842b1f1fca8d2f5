#!/usr/bin/env python3
# Copyright (c) 2025, falcon-mcore contributors. All rights reserved.

"""Compare the pure-PyTorch Mamba-2 ops and the mamba_ssm / causal_conv1d kernels with a naive
reference.

Run on a CUDA machine that has ``mamba_ssm`` (Triton kernels) and ``causal_conv1d`` installed::

    python scripts/gpu/check_mamba2_torch.py --out mamba2_torch_vs_kernels.json

For every op in ``megatron_overlay/megatron/core/ssm/mamba2_torch.py`` (causal conv, conv
update, chunked scan incl. seq_idx / initial and final states / varlen states, the fused split
path in Megatron's training configuration and with norm + out_proj, gated RMSNorm, decode state
update) and for float32 and bfloat16, it runs the kernel, our torch op and the naive reference
of ``megatron_overlay/tests/unit_tests/ssm/mamba2_naive.py`` (a token-by-token recurrence and a
position-by-position convolution written from the equations, run in float64 on the same rounded
inputs; its gradients are checked against finite differences here first, on the problems of
the CPU tests) on identical inputs. It compares forward outputs, final states and the gradients
of all differentiable inputs (of a fixed random projection of the outputs) and writes a JSON
report. The cases, their inputs, the references behind the kernels' signatures and the
comparison helpers are those of the CPU tests (``mamba2_cases.py`` next to ``mamba2_naive.py``);
this script adds the kernels, the tolerances, the known failures, the timing and the report.

Error metric: ``rel = max|a - ref| / max|ref|`` against the naive reference, for the kernel
(``rel_kernel_vs_naive``) and for our op (``rel_torch_vs_naive``); ``rel_torch_vs_kernel`` is
reported too. A check passes when both implementations are within the tolerance of their dtype
and kind (forward / gradient) of the reference. The kernels use TF32 tensor cores for float32
matmuls (Triton's default) and keep some intermediates in the input dtype, hence the looser
kernel tolerances; our op runs true float32 (TF32 off) and gets the tighter TORCH_TOLERANCES.
``--kernel-fp32-ieee`` sets ``TRITON_F32_DEFAULT=ieee`` so the float32 kernel runs are free of
TF32 too, and tightens the kernel's float32 tolerances accordingly. A wall-clock fwd+bwd timing
(and peak memory) of MambaMixer's training call is recorded for both implementations
(``--no-timing`` skips it).

Green or named: a failing check is a *known failure* only if it matches an entry of
KNOWN_FAILURES (which names the reason) and our op agrees with the naive reference there (so the
reference, not our op, says the kernel is wrong). The exit status is 0 only when every other
check passed, no case raised, the reference passed its finite-difference self-check and every
known-failure entry whose case ran still fails (a stale entry must be removed).

``--dry-run-cpu`` runs everything on CPU with small shapes using the torch ops as the "kernel";
it exercises this script (argument plumbing, the reference, report writing), not the kernels.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAY = REPO_ROOT / "megatron_overlay"
# The helpers of the overlay's Mamba-2 tests: inputs, cases, reference adapters, comparisons.
SSM_TESTS = OVERLAY / "tests" / "unit_tests" / "ssm"
sys.path.insert(0, str(REPO_ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)

# rel-error tolerances (normalised by the kernel output's max magnitude)
# By default Triton runs float32 tl.dot on TF32 tensor cores (~1e-3 relative error);
# --kernel-fp32-ieee makes the kernels use full fp32 and switches to the tighter float32 row.
TOLERANCES = {"float32": {"fwd": 5e-3, "grad": 1e-2}, "bfloat16": {"fwd": 3e-2, "grad": 6e-2}}
TOLERANCES_FP32_IEEE = {"fwd": 2e-4, "grad": 1e-3}
# Our op against the reference: true fp32 matmuls (TF32 off); measured ~1e-5 at l=1000.
TORCH_TOLERANCES = {"float32": {"fwd": 1e-4, "grad": 1e-4}, "bfloat16": TOLERANCES["bfloat16"]}

# Failures of the kernels that are expected, each with its reason. One matches a failing check
# when the case and tensor match, only the kernel is off the naive reference (our op agrees with
# it) and real kernels ran; an entry that matches nothing while its case ran is stale (the
# kernel was fixed or the inputs changed): the run fails until the entry is removed.
KNOWN_FAILURES = [
    dict(
        impl="kernel",
        cases=["conv_seq_idx", "conv_seq_idx_init"],
        tensors=["grad:x", "grad:weight", "grad:bias"],
        reason="causal_conv1d (1.7.0, H100 run of 2026-11-26) backward with seq_idx: its "
        "forward agreed with our op, its gradients did not (rel 0.2-0.8 on x, weight, bias; our "
        "op matched our fp64 op there: the naive reference decides now). The inputs hold padding "
        "tokens (seq_idx -1) whose outputs the forward sets to 0; the channel-last backward in "
        "causal_conv1d's source (csrc/causal_conv1d_bwd.cu, read at v1.6.1) does not mask them, "
        "so padding gradients would leak into dx/dweight/dbias: conv_seq_idx_nopad (no padding) "
        "tests that explanation and is not expected to fail. MambaMixer's training path passes "
        "seq_idx only to the fused split kernel (split_megatron_seq_idx, which passes).",
    ),
    dict(
        impl="kernel",
        cases=["conv_init_final"],
        tensors=["grad:x"],
        reason="causal_conv1d (1.7.0, H100 run of 2026-11-26) backward with initial_states and "
        "return_final_states: dx disagrees (rel ~1.5) while dweight, dbias and dinitial_states "
        "agree, i.e. the gradient arriving through final_states reaches dx wrongly. MambaMixer's "
        "training path does not return final conv states.",
    ),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_torch_ops():
    """Import mamba2_torch from this checkout's overlay (or an already patched tree)."""
    if OVERLAY.is_dir():
        use("overlay")
    try:
        from megatron.core.ssm import mamba2_torch

        return mamba2_torch
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "mamba2_torch", OVERLAY / "megatron" / "core" / "ssm" / "mamba2_torch.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def load_ssm_test_module(name):
    """A module of the overlay's tests/unit_tests/ssm, loaded from its file (its ``tests``
    package would clash with this project's ``tests`` under pytest); it imports only torch."""
    spec = importlib.util.spec_from_file_location(name, SSM_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shared = load_ssm_test_module("mamba2_cases")
Ops, Shapes, torch_ops, naive_ops = (
    shared.Ops,
    shared.Shapes,
    shared.torch_ops,
    shared.naive_ops,
)


def dry_run_kernel_ops(m2):
    """--dry-run-cpu: our torch ops stand in for the kernels."""
    ops = torch_ops(m2)
    ops.name = "torch-as-kernel (dry run)"
    ops.version = {"mamba_ssm": "n/a (dry run)", "causal_conv1d": "n/a (dry run)"}
    return ops


def kernel_ops():
    """The real kernels. mamba_ssm's package __init__ imports the Mamba-1 CUDA extension
    ``selective_scan_cuda``, which Python-only builds lack; a placeholder module lets the
    package import (Mamba-1 kernels, not used here, would then fail loudly)."""
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        placeholder = types.ModuleType("selective_scan_cuda")
        placeholder.__doc__ = "placeholder inserted by check_mamba2_torch.py"
        sys.modules["selective_scan_cuda"] = placeholder
    import causal_conv1d
    import mamba_ssm
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
    )

    ops = Ops(
        "kernel",
        causal_conv1d_fn,
        causal_conv1d_update,
        mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined,
        RMSNorm,
        selective_state_update,
    )
    ops.version = {
        "mamba_ssm": getattr(mamba_ssm, "__version__", "unknown"),
        "causal_conv1d": getattr(causal_conv1d, "__version__", "unknown"),
    }
    return ops


def load_naive():
    """The naive references (pure torch, no Megatron import), loaded from the overlay file."""
    return load_ssm_test_module("mamba2_naive")


def naive_selfcheck(nv):
    """The reference's gradients against central finite differences (float64, tiny sizes, CPU),
    the problems test_mamba2_naive.py checks: the scan with every option and the conv with
    seq_idx padding and initial states."""
    problems = {
        "scan": shared.naive_scan_gradcheck_problem(nv.naive_scan, 2, "seq_idx_limit_dhp"),
        "conv": shared.naive_conv_gradcheck_problem(nv.naive_conv, "seq_idx_pad_init"),
    }
    return {
        name: bool(torch.autograd.gradcheck(fn, leaves, raise_exception=False))
        for name, (fn, leaves) in problems.items()
    }


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def known_failure(case, tensor, failing, real_kernels):
    """Index of the KNOWN_FAILURES entry that explains a failing check, or None: only when real
    kernels ran, only the kernel is off the reference (our op agrees with it), and the case and
    tensor are listed."""
    if not real_kernels or failing != ["kernel"]:
        return None
    for i, entry in enumerate(KNOWN_FAILURES):
        if entry["impl"] == "kernel" and case in entry["cases"] and tensor in entry["tensors"]:
            return i
    return None


def stale_known_failures(results, real_kernels):
    """Entries whose cases ran with real kernels but matched no failing check."""
    if not real_kernels:
        return []
    ran = {r["case"] for r in results}
    matched = {r["known_failure"] for r in results if "known_failure" in r}
    return [
        i
        for i, entry in enumerate(KNOWN_FAILURES)
        if i not in matched and ran.intersection(entry["cases"])
    ]


def cuda_time_ms(fn, iters=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON report to write")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ngroups", default="1,2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=1000)
    parser.add_argument("--nheads", type=int, default=24)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-timing", action="store_true", help="skip the fwd+bwd timings")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument(
        "--kernel-fp32-ieee",
        action="store_true",
        help="set TRITON_F32_DEFAULT=ieee (fresh Triton cache) so the kernels' float32 matmuls "
        "do not use TF32, and use tighter float32 tolerances",
    )
    parser.add_argument(
        "--autotune",
        choices=("all", "smallest"),
        default="all",
        help="smallest: mamba_ssm's autotuned kernels compile only their smallest-tile "
        "configuration (scripts/lib/triton_configs.py), to fit a cold Triton cache into a "
        "device call; what the kernels compute is unchanged",
    )
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="CPU, small shapes, torch ops on both sides (tests this script)",
    )
    args = parser.parse_args()

    tolerances = {k: dict(v) for k, v in TOLERANCES.items()}
    autotune = {"mode": args.autotune}
    if args.kernel_fp32_ieee:
        # must happen before Triton compiles anything; a separate cache avoids reusing TF32
        # binaries compiled by earlier runs
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_ieee_cache_")
        tolerances["float32"] = dict(TOLERANCES_FP32_IEEE)
    m2 = load_torch_ops()
    mine = torch_ops(m2)
    nv = load_naive()
    naive = naive_ops(nv)
    real_kernels = not args.dry_run_cpu
    if args.dry_run_cpu:
        device = torch.device("cpu")
        kernel = dry_run_kernel_ops(m2)
        S = Shapes(2, 50, 4, 8, 16, 16)
    else:
        if not torch.cuda.is_available():
            sys.exit("CUDA is required (use --dry-run-cpu to exercise the script on CPU)")
        device = torch.device("cuda")
        kernel = kernel_ops()
        if args.autotune == "smallest":
            from triton_configs import keep_smallest_config  # scripts/lib

            autotune.update(keep_smallest_config("mamba_ssm.ops.triton"))
        S = Shapes(args.batch, args.seqlen, args.nheads, args.headdim, args.dstate, args.chunk_size)
        # the torch ops must run true fp32 matmuls; record the setting in the report
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    groups = [int(g) for g in args.ngroups.split(",") if g.strip()]
    cases = list(shared.CASES.items())
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {name for name, _ in cases}
        if unknown:
            sys.exit(f"--cases: unknown {sorted(unknown)}; choose from {[n for n, _ in cases]}")
        cases = [c for c in cases if c[0] in wanted]

    errors, results, timings = [], [], []
    selfcheck = naive_selfcheck(nv)
    print(f"naive reference gradients vs finite differences: {selfcheck}")
    if not all(selfcheck.values()):
        errors.append(dict(case="naive_selfcheck", error=f"gradcheck failed: {selfcheck}"))

    header = (
        f"{'case':28s} {'dtype':8s} {'g':>1s} {'tensor':16s} {'t_vs_ref':>9s} {'k_vs_ref':>9s} "
        f"{'t_vs_k':>9s} {'tol_t':>6s} {'tol_k':>6s}  status"
    )
    print(header)
    print("-" * len(header))
    for dname in dtypes:
        dtype = DTYPES[dname]
        for g in groups:
            for cname, build in cases:
                gen = torch.Generator().manual_seed(args.seed)
                try:
                    inputs, grad_keys, fn = build(S, g, dtype, device, gen)
                    weights = shared.output_weights(kernel, inputs, fn, gen, device)
                    got_k = shared.evaluate(kernel, inputs, grad_keys, fn, weights)
                    got_t = shared.evaluate(mine, inputs, grad_keys, fn, weights)
                    got_ref = shared.evaluate(naive, inputs, grad_keys, fn, weights, to64=True)
                except Exception as exc:  # record and continue with the other cases
                    errors.append(
                        dict(
                            case=cname,
                            dtype=dname,
                            ngroups=g,
                            error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=6),
                        )
                    )
                    print(f"{cname:28s} {dname:8s} {g:1d} ERROR {type(exc).__name__}: {exc}")
                    continue
                for key in got_ref:
                    kind = "grad" if key.startswith("grad:") else "fwd"
                    tol_k, tol_t = tolerances[dname][kind], TORCH_TOLERANCES[dname][kind]
                    _, rel_t = shared.rel_err(got_t[key], got_ref[key])
                    _, rel_k = shared.rel_err(got_k[key], got_ref[key])
                    max_abs, rel_tk = shared.rel_err(got_t[key], got_k[key])
                    failing = [
                        name
                        for name, rel, tol in (("torch", rel_t, tol_t), ("kernel", rel_k, tol_k))
                        if not rel <= tol  # nan fails
                    ]
                    entry = known_failure(cname, key, failing, real_kernels)
                    status = "known_failure" if entry is not None else "FAIL" if failing else "pass"
                    rec = dict(
                        case=cname,
                        dtype=dname,
                        ngroups=g,
                        tensor=key,
                        kind=kind,
                        rel_torch_vs_naive=rel_t,
                        rel_kernel_vs_naive=rel_k,
                        rel_torch_vs_kernel=rel_tk,
                        max_abs_torch_vs_kernel=max_abs,
                        tol_torch=tol_t,
                        tol_kernel=tol_k,
                        status=status,
                        passed=status == "pass",
                        failing=failing,
                        torch_dtype=str(got_t[key].dtype),
                        kernel_dtype=str(got_k[key].dtype),
                    )
                    for name in failing:  # where the largest error sits
                        rec[f"worst_index_{name}"] = shared.worst_index(
                            (got_t if name == "torch" else got_k)[key], got_ref[key]
                        )
                    if entry is not None:
                        rec["known_failure"] = entry
                    results.append(rec)
                    print(
                        f"{cname:28s} {dname:8s} {g:1d} {key:16s} {rel_t:9.2e} {rel_k:9.2e} "
                        f"{rel_tk:9.2e} {tol_t:6.0e} {tol_k:6.0e}  {status}"
                    )
                del got_k, got_t, got_ref

            if not args.no_timing and device.type == "cuda":
                # fwd+bwd of MambaMixer's training call, kernel vs torch
                gen = torch.Generator().manual_seed(args.seed)
                inputs, grad_keys, fn = shared.case_split(S, g, dtype, device, gen, "megatron")
                weights = shared.output_weights(kernel, inputs, fn, gen, device)
                for ops in (kernel, mine):
                    try:
                        torch.cuda.reset_peak_memory_stats()
                        ms = cuda_time_ms(
                            lambda: shared.evaluate(ops, inputs, grad_keys, fn, weights)
                        )
                        peak = torch.cuda.max_memory_allocated() / 2**20
                        timings.append(
                            dict(
                                case="split_megatron_seq_idx fwd+bwd",
                                dtype=dname,
                                ngroups=g,
                                impl=ops.name,
                                ms=ms,
                                peak_mib=peak,
                            )
                        )
                        print(
                            f"timing split fwd+bwd {dname} g={g} {ops.name:6s}: {ms:8.2f} ms, "
                            f"peak {peak:8.1f} MiB"
                        )
                    except Exception as exc:
                        errors.append(
                            dict(
                                case="timing",
                                dtype=dname,
                                ngroups=g,
                                error=f"{ops.name}: {type(exc).__name__}: {exc}",
                            )
                        )

    matched = {r["known_failure"] for r in results if "known_failure" in r}
    for i in stale_known_failures(results, real_kernels):
        errors.append(
            dict(case="known_failures", error=f"KNOWN_FAILURES[{i}] did not fail although its "
                 f"cases ran ({KNOWN_FAILURES[i]['cases']}): remove the entry if the kernel is "
                 "fixed")  # fmt: skip
        )
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_known = sum(r["status"] == "known_failure" for r in results)
    summary = dict(
        n_checks=len(results),
        n_passed=sum(r["status"] == "pass" for r in results),
        n_failed=n_fail,
        n_known_failures=n_known,
        n_errors=len(errors),
        known_failures=[
            f"{KNOWN_FAILURES[i]['impl']}: {', '.join(KNOWN_FAILURES[i]['cases'])} "
            f"({sum(r.get('known_failure') == i for r in results)} checks)"
            for i in sorted(matched)
        ],
        failed=sorted({f"{r['case']} {r['tensor']} ({'+'.join(r['failing'])})"
                       for r in results if r["status"] == "FAIL"}),  # fmt: skip
        all_passed=n_fail == 0 and not errors and bool(results),
    )
    report = dict(
        script="scripts/gpu/check_mamba2_torch.py",
        **provenance(sys.argv),
        dry_run_cpu=args.dry_run_cpu,
        kernel_versions=kernel.version,
        settings=dict(
            shapes=S.as_dict(),
            dtypes=dtypes,
            ngroups=groups,
            seed=args.seed,
            torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            reference="naive float64 recurrence / convolution on the same rounded inputs "
            "(megatron_overlay/tests/unit_tests/ssm/mamba2_naive.py)",
            metric="rel = max|impl - reference| / max|reference|",
            kernel_fp32_ieee=args.kernel_fp32_ieee,
            autotune=autotune,
            kernel_tolerances=tolerances,
            torch_tolerances=TORCH_TOLERANCES,
        ),
        naive_selfcheck=selfcheck,
        known_failures_declared=KNOWN_FAILURES,
        summary=summary,
        results=results,
        errors=errors,
        timings=timings,
    )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\n{summary['n_passed']}/{summary['n_checks']} checks passed, "
        f"{n_known} known failures ({'; '.join(summary['known_failures']) or 'none'}), "
        f"{n_fail} unexpected failures, {summary['n_errors']} errors; report: {out_path}"
    )
    for e in errors:
        print(f"ERROR {e.get('case')}: {e['error']}")
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
