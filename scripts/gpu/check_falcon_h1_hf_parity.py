#!/usr/bin/env python3
"""GPU check: Megatron Falcon-H1 vs HF FalconH1ForCausalLM with the mamba_ssm kernels.

Builds the same random 2-layer Falcon-H1 twice (HF transformers and Megatron's
ParallelHybridLayer stack, weights mapped 1:1 and loaded strictly: a missing or unexpected key
fails the run and is listed), with the oracle's 14 distinct multipliers, all != 1
(tests/falcon_h1/oracle.py, the same config as the CPU parity test). It runs all 8 combinations
of n_groups 1 / 2 x mamba_rms_norm off / on x Megatron's memory-efficient / plain Mamba path on
CUDA, in fp32 (logits and every parameter gradient; TF32 off in torch and, by default, in the
Triton kernels: --kernel-fp32) and bf16 (logits), and checks
that Megatron's Mamba ops really ran on the kernels (mamba_ssm / causal_conv1d), not on the
PyTorch fallback.

Negative control: in two of the combinations each of the 14 multipliers in turn is dropped
(set to 1, as if a code path did not apply it) in the Megatron model only; each must move the
fp32 logits by at least NEGATIVE_CONTROL_FACTOR x the fp32 tolerance, so the tolerance catches
any one multiplier that is not applied (with the 0.5B release multipliers attention_in is 1:
dropping it could not be seen). Writes a JSON report (provenance, tolerances, per-case results,
summary with pass/fail counts) to --out; exit status 0 only if every check passed.

With --transformer-impl transformer_engine the Megatron model uses the TE Falcon-H1 spec (TE
linears fold the multipliers into their weights for these 600-token inputs).

Run from a repo checkout with the patched tree at build/Megatron-LM (or --megatron PATH):
    python scripts/gpu/check_falcon_h1_hf_parity.py --out falcon_h1_hf_parity.json
On CPU (this script's logic, no kernels; tiny shape, seq 21):
    python scripts/gpu/check_falcon_h1_hf_parity.py --cpu-smoke --out /tmp/parity.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)

# Tolerances. fp32 (TF32 off in torch and Triton): kernel reduction order only; relative to the
# logit scale (max |HF logits|); measured 1.5e-6..3.5e-6 on an H200 with the 14 distinct
# multipliers (with Triton's TF32 dots the gated-norm cases reached 4.2e-4). Gradients: max over
# parameters of max|diff| / max|HF grad| (measured <= 9.4e-6). bf16: both models round
# activations to bf16 at different points, so Megatron in bf16 is judged by its distance from HF
# in fp32, which must stay within BF16_VS_HF_FACTOR x HF's own bf16 distance from its fp32
# logits (about 1.5e-2 to 3e-2 of the logit scale here), and below BF16_LOGITS_REL_MAX.
FP32_LOGITS_REL = 2e-4
FP32_GRAD_REL = 1e-3
BF16_VS_HF_FACTOR = 1.5
BF16_LOGITS_REL_MAX = 0.1
NEGATIVE_CONTROL_FACTOR = 5.0
# Transformer Engine runs fp32 GEMMs with TF32 tensor cores (measured on the H200: TE-spec fp32
# logits 1.4e-3..1.5e-3 of the scale from HF's, whatever torch's TF32 switch says). With
# --transformer-impl transformer_engine the fp32 checks are therefore judged like the bf16 one:
# against HF's own distance when its matmuls run in TF32 (same inputs), times TF32_VS_HF_FACTOR
# (and never tighter than the fp32 tolerances above).
TF32_VS_HF_FACTOR = 3.0
MULTIPLIER_SCALARS = [  # (config field, index in a list field or None): the 14 numbers
    ("embedding_multiplier", None),
    ("lm_head_multiplier", None),
    ("key_multiplier", None),
    ("attention_in_multiplier", None),
    ("attention_out_multiplier", None),
    ("ssm_in_multiplier", None),
    ("ssm_out_multiplier", None),
    *[("mlp_multipliers", i) for i in range(2)],
    *[("ssm_multipliers", i) for i in range(5)],
]
# Kernel entry points of megatron.core.ssm.mamba2_dispatch, counted while a case runs.
KERNEL_HOOKS = {
    "split": "_kernel_split_scan",
    "chunk_scan": "_kernel_chunk_scan",
    "conv1d": "_kernel_conv1d",
    "rmsnorm": "_kernel_rmsnorm_fn",
}


def _install_selective_scan_placeholder() -> None:
    """The GPU wheel of mamba_ssm lacks the Mamba-1 extension; let the package import."""
    if "selective_scan_cuda" not in sys.modules:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


def dropped(multipliers: dict, field: str, index: int | None) -> dict:
    """A copy of ``multipliers`` with one of the 14 numbers set to 1 (not applied)."""
    out = {k: list(v) if isinstance(v, list) else v for k, v in multipliers.items()}
    if index is None:
        out[field] = 1.0
    else:
        out[field][index] = 1.0
    return out


def count_kernel_calls(dispatch) -> dict:
    """Wrap the dispatch module's kernel entry points with call counters (for this process)."""
    counts = {name: 0 for name in KERNEL_HOOKS}
    for name, attr in KERNEL_HOOKS.items():
        fn = getattr(dispatch, attr)
        if fn is None:
            continue

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        setattr(dispatch, attr, counted)
    return counts


def expected_kernels(mem_eff: bool, rms_norm: bool) -> list[str]:
    """Kernels Megatron's MambaMixer must call in a training forward + backward on CUDA."""
    names = ["split"] if mem_eff else ["chunk_scan", "conv1d"]
    return names + (["rmsnorm"] if rms_norm else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--megatron", default=str(ROOT / "build" / "Megatron-LM"))
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="CPU, the oracle's tiny shape, seq 21"
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=290,
        help="abort with a traceback after N s (the GPU job's default step limit is 300 s)",
    )
    parser.add_argument(
        "--transformer-impl",
        choices=("local", "transformer_engine"),
        default="local",
        help="Megatron's Falcon-H1 spec: local modules or Transformer Engine (needs TE, CUDA)",
    )
    parser.add_argument(
        "--kernel-fp32",
        choices=("ieee", "tf32"),
        default="ieee",
        help="precision of fp32 tl.dot in the Triton kernels (mamba_ssm's SSD scan, both models; "
        "sets TRITON_F32_DEFAULT): ieee (default) makes the fp32 checks true fp32, as torch's "
        "TF32 switch does not reach Triton; tf32 is Triton's own default",
    )
    parser.add_argument(
        "--autotune",
        choices=("all", "smallest"),
        default="all",
        help="smallest: mamba_ssm's autotuned kernels compile only their smallest-tile "
        "configuration (scripts/lib/triton_configs.py; a cold Triton cache with IEEE fp32 dots "
        "otherwise spends minutes per case compiling)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated case names, e.g. g1_norm0_memeff,g2_norm1_plain (default: all 8)",
    )
    args = parser.parse_args()
    if args.cpu_smoke:
        args.device, args.seq_len = "cpu", 21

    # The GPU machine has no network: never let transformers reach for the kernels hub
    # (it would retry downloads); HF then uses the installed mamba_ssm / causal_conv1d.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before anything imports triton: its tl.dot reads the default precision from here.
    os.environ["TRITON_F32_DEFAULT"] = args.kernel_fp32
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    _install_selective_scan_placeholder()
    use("tests", "megatron", megatron=args.megatron)
    import torch
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from falcon_h1.oracle import (
        MULTIPLIERS,
        TinyShape,
        build_hf_model,
        build_megatron_model,
        hf_to_megatron_state_dict,
        load_hf_weights,
        megatron_config,
    )
    from megatron.core import parallel_state
    from megatron.core.ssm import mamba2_dispatch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run on the GPU machine, or use --cpu-smoke")
    need_kernels = device.type == "cuda"
    if need_kernels and not (
        mamba2_dispatch.HAVE_MAMBA_SSM_KERNELS and mamba2_dispatch.HAVE_CAUSAL_CONV1D_KERNELS
    ):
        sys.exit(
            "mamba_ssm and causal_conv1d kernels are required on CUDA (install the wheels; "
            "scripts/gpu/run_gpu_tests.sh does it from .carry/wheels)"
        )
    if os.environ.get(mamba2_dispatch.FORCE_TORCH_ENV, "0") == "1":
        sys.exit(f"{mamba2_dispatch.FORCE_TORCH_ENV}=1 would bypass the kernels: unset it")
    calls = count_kernel_calls(mamba2_dispatch)
    autotune = {"mode": args.autotune}
    if args.autotune == "smallest" and need_kernels:
        from triton_configs import keep_smallest_config  # scripts/lib

        autotune.update(keep_smallest_config("mamba_ssm.ops.triton"))
    init_file = Path(tempfile.mkdtemp()) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)

    def shape_for(groups: int, rms_norm: bool) -> TinyShape:
        if args.cpu_smoke:  # the CPU parity test's shape (head_dim 24 != 64 / 4, chunk 8)
            return TinyShape(mamba_groups=groups, rms_norm=rms_norm)
        # 0.5B-like ratios: head_dim 64 != hidden / heads, chunk 64 (seq 300 is not a multiple)
        return TinyShape(
            layers=2, hidden=256, heads=8, kv_heads=2, head_dim=64, ffn=512, vocab=1024,
            mamba_heads=8, mamba_head_dim=64, mamba_groups=groups, d_state=64, chunk=64,
            rms_norm=rms_norm,
        )  # fmt: skip

    g = torch.Generator().manual_seed(3)
    batch = 2
    tokens_cpu = torch.randint(0, shape_for(1, False).vocab, (batch, args.seq_len), generator=g)
    tokens = tokens_cpu.to(device)
    positions = torch.arange(args.seq_len, device=device).unsqueeze(0).expand(batch, -1)
    grad_weights = None

    def hf_tf32_tolerances(hf, hf_logits, scale) -> tuple[float, float]:
        """(logits, grad) tolerances for a model whose GEMMs run in TF32: TF32_VS_HF_FACTOR x
        HF's own TF32-vs-fp32 distance (logits; gradients of the same weighted sum)."""
        nonlocal grad_weights
        if grad_weights is None:
            grad_weights = torch.randn(hf_logits.shape, generator=g).to(device)
        hf.zero_grad(set_to_none=True)
        (hf(input_ids=tokens).logits * grad_weights).sum().backward()
        ref = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
        hf.zero_grad(set_to_none=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32_logits = hf(input_ids=tokens).logits
            (tf32_logits * grad_weights).sum().backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        logits_rel = (tf32_logits - hf_logits).abs().max().item() / scale
        grad_rel = max(
            ((p.grad - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item()
            for n, p in hf.named_parameters()
            if p.grad is not None
        )
        hf.zero_grad(set_to_none=True)
        return (
            max(FP32_LOGITS_REL, TF32_VS_HF_FACTOR * logits_rel),
            max(FP32_GRAD_REL, TF32_VS_HF_FACTOR * grad_rel),
        )

    def megatron_logits(mg):
        return mg(input_ids=tokens, position_ids=positions, attention_mask=None)

    def build_megatron(shape, multipliers, mem_eff, hf):
        config = megatron_config(shape, multipliers, use_mamba_mem_eff_path=mem_eff)
        mg = build_megatron_model(shape, config, transformer_impl=args.transformer_impl)
        load_hf_weights(mg, hf.state_dict(), shape)  # strict: lists missing/unexpected keys
        return mg.to(device)

    names = [
        f"g{g_}_norm{int(n_)}_{'memeff' if m_ else 'plain'}"
        for g_ in (1, 2)
        for n_ in (False, True)
        for m_ in (True, False)
    ]
    wanted = [c for c in args.cases.split(",") if c] or names
    if set(wanted) - set(names):
        sys.exit(f"--cases: unknown {sorted(set(wanted) - set(names))}; choose from {names}")
    cases, failures = [], []
    controls = {(1, False, True), (2, True, False)}  # (n_groups, rms_norm, mem_eff)
    for groups in (1, 2):
        for rms_norm in (False, True):
            for mem_eff in (True, False):
                t0 = time.time()
                name = f"g{groups}_norm{int(rms_norm)}_{'memeff' if mem_eff else 'plain'}"
                if name not in wanted:
                    continue
                shape = shape_for(groups, rms_norm)
                record = {
                    "case": name,
                    "n_groups": groups,
                    "mamba_rms_norm": rms_norm,
                    "mem_eff_path": mem_eff,
                    "seq_len": args.seq_len,
                    "shape": vars(shape),
                }
                checks = {}
                try:
                    hf = build_hf_model(shape, MULTIPLIERS).to(device)
                    mg = build_megatron(shape, MULTIPLIERS, mem_eff, hf)
                    for key in calls:
                        calls[key] = 0
                    # fp32: logits and every parameter gradient.
                    hf_logits = hf(input_ids=tokens).logits
                    mg_logits = megatron_logits(mg)
                    scale = hf_logits.abs().max().item()
                    diff = (hf_logits - mg_logits).abs().max().item()
                    record["logit_scale"] = scale
                    record["fp32_logits_max_abs_diff"] = diff
                    record["fp32_logits_rel_to_scale"] = diff / scale
                    logits_tol, grad_tol = FP32_LOGITS_REL, FP32_GRAD_REL
                    if args.transformer_impl == "transformer_engine":
                        logits_tol, grad_tol = hf_tf32_tolerances(hf, hf_logits, scale)
                        record["fp32_tolerances_from_hf_tf32"] = [logits_tol, grad_tol]
                    checks["fp32_logits"] = diff / scale <= logits_tol
                    if grad_weights is None:
                        grad_weights = torch.randn(hf_logits.shape, generator=g).to(device)
                    (hf_logits * grad_weights).sum().backward()
                    (mg_logits * grad_weights).sum().backward()
                    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
                    mapped = hf_to_megatron_state_dict(hf_grads, shape)
                    mg_params = dict(mg.named_parameters())
                    record["grads_missing_in_megatron"] = sorted(set(mapped) - set(mg_params))
                    record["grads_missing_in_hf"] = sorted(set(mg_params) - set(mapped))
                    record["megatron_params_without_grad"] = sorted(
                        n for n, p in mg_params.items() if p.grad is None
                    )
                    worst, worst_name = 0.0, None
                    for n, p in mg_params.items():
                        if n not in mapped or p.grad is None:
                            continue
                        ref = mapped[n]
                        rel = ((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                        if not rel <= worst:  # nan counts as worst
                            worst, worst_name = rel, n
                    record["fp32_grad_max_rel_diff"] = worst
                    record["fp32_grad_worst_param"] = worst_name
                    checks["fp32_grads"] = (
                        worst <= grad_tol
                        and not record["grads_missing_in_megatron"]
                        and not record["grads_missing_in_hf"]
                        and not record["megatron_params_without_grad"]
                    )
                    record["kernel_calls"] = dict(calls)
                    if need_kernels:
                        missing = [k for k in expected_kernels(mem_eff, rms_norm) if not calls[k]]
                        record["kernels_not_called"] = missing
                        checks["megatron_used_kernels"] = not missing
                    # Negative control (fp32, before the models turn bf16): each multiplier,
                    # dropped in Megatron only, must move the logits well past the tolerance.
                    if (groups, rms_norm, mem_eff) in controls:
                        effects = {}
                        with torch.no_grad():
                            for field, index in MULTIPLIER_SCALARS:
                                label = field if index is None else f"{field}[{index}]"
                                wrong = dropped(MULTIPLIERS, field, index)
                                mg_wrong = build_megatron(shape, wrong, mem_eff, hf)
                                moved = (megatron_logits(mg_wrong) - hf_logits).abs().max().item()
                                effects[label] = moved / scale
                                del mg_wrong
                        record["negative_control_rel_to_scale"] = effects
                        weak = [
                            k
                            for k, v in effects.items()
                            if not v >= NEGATIVE_CONTROL_FACTOR * logits_tol
                        ]
                        record["negative_control_too_weak"] = weak
                        checks["negative_control"] = len(effects) == 14 and not weak
                    # bf16: logits only.
                    hf.zero_grad(set_to_none=True)
                    mg.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        hf_b = hf.to(torch.bfloat16)(input_ids=tokens).logits.float()
                        mg_b = megatron_logits(mg.to(torch.bfloat16)).float()
                    hf_logits = hf_logits.detach()
                    err_hf = (hf_b - hf_logits).abs().max().item() / scale
                    err_mg = (mg_b - hf_logits).abs().max().item() / scale
                    record["bf16_megatron_vs_bf16_hf_rel_to_scale"] = (
                        (hf_b - mg_b).abs().max().item() / scale
                    )
                    record["bf16_hf_vs_fp32_hf_rel_to_scale"] = err_hf
                    record["bf16_megatron_vs_fp32_hf_rel_to_scale"] = err_mg
                    checks["bf16_logits"] = (
                        err_mg <= BF16_VS_HF_FACTOR * err_hf and err_mg <= BF16_LOGITS_REL_MAX
                    )
                    del mg, mg_b, hf_b
                    del hf
                except Exception as exc:  # noqa: BLE001 - record, fail the case, go on
                    import traceback

                    record["error"] = "".join(traceback.format_exception(exc))[-4000:]
                    checks["no_error"] = False
                record["checks"] = checks
                record["pass"] = bool(checks) and all(checks.values())
                record["seconds"] = round(time.time() - t0, 1)
                failures += [f"{name}: {k}" for k, v in checks.items() if not v]
                cases.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "shape"}), flush=True)

    n_checks = sum(len(c["checks"]) for c in cases)
    report = {
        "check": "falcon_h1_hf_parity",
        **provenance(sys.argv),
        "run_device": str(device),
        "transformer_impl": args.transformer_impl,
        "kernel_fp32": args.kernel_fp32,
        "autotune": autotune,
        "cpu_smoke": args.cpu_smoke,
        "multipliers": MULTIPLIERS,
        "tolerances": {
            "fp32_logits_rel_to_scale": FP32_LOGITS_REL,
            "fp32_grad_rel": FP32_GRAD_REL,
            "bf16_megatron_vs_fp32_hf": f"<= {BF16_VS_HF_FACTOR} x bf16_hf_vs_fp32_hf and <= "
            f"{BF16_LOGITS_REL_MAX} (relative to the logit scale)",
            "negative_control": "each multiplier set to 1 moves fp32 logits by >= "
            f"{NEGATIVE_CONTROL_FACTOR} x fp32_logits_rel_to_scale",
            "transformer_engine_fp32": f"{TF32_VS_HF_FACTOR} x HF's TF32-vs-fp32 distance "
            "(per case: fp32_tolerances_from_hf_tf32), at least the fp32 tolerances",
        },
        "summary": {
            "n_cases": len(cases),
            "n_checks": n_checks,
            "n_passed": n_checks - len(failures),
            "n_failed": len(failures),
            "failed": failures,
        },
        "cases": cases,
        "pass": bool(cases) and not failures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['summary']['n_passed']}/{n_checks} checks passed; failed: {failures or 'none'}")
    print(f"pass={report['pass']} -> {args.out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        faulthandler.cancel_dump_traceback_later()
