#!/usr/bin/env python3
"""GPU check: Megatron Falcon-H1 vs HF FalconH1ForCausalLM with the mamba_ssm kernels.

Builds the same random Falcon-H1 twice (HF transformers and Megatron's ParallelHybridLayer
stack, weights mapped 1:1), runs both on CUDA in fp32 and bf16 (both sides use mamba_ssm /
causal_conv1d kernels when installed; Megatron's local spec uses SDPA attention), and compares
logits and, in fp32, parameter gradients. Writes a JSON report (device, versions, date, command,
errors, pass/fail) to --out.

Run from a repo checkout with the patched tree at build/Megatron-LM (or --megatron PATH):
    python scripts/gpu/check_falcon_h1_hf_parity.py --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Tolerances: fp32 (TF32 off) allows kernel reduction-order differences; bf16 is relative to the
# logit scale (both models round activations to bf16 at different points).
FP32_LOGITS_ATOL = 2e-4
BF16_LOGITS_REL = 3e-2


def _install_selective_scan_placeholder() -> None:
    """The GPU wheel of mamba_ssm lacks the Mamba-1 extension; let the package import."""
    if "selective_scan_cuda" not in sys.modules:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "transformers", "mamba_ssm", "causal_conv1d"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - report, don't fail
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--megatron", default=str(ROOT / "build" / "Megatron-LM"))
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=int, default=300, help="abort with a traceback after N s")
    args = parser.parse_args()

    # The GPU machine has no network: never let transformers reach for the kernels hub
    # (it would retry downloads); HF then uses the installed mamba_ssm / causal_conv1d.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    _install_selective_scan_placeholder()
    sys.path.insert(0, args.megatron)
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from falcon_h1.oracle import (
        MULTIPLIERS_0_5B,
        TinyShape,
        build_hf_model,
        build_megatron_model,
        hf_to_megatron_state_dict,
        megatron_config,
    )
    from megatron.core import parallel_state
    from megatron.core.ssm import mamba2_dispatch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device = torch.device(args.device)
    init_file = Path(tempfile.mkdtemp()) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)

    # A mid-size shape with 0.5B-like ratios: head_dim 64 != hidden / heads, chunk 64, 2 layers.
    cases = []
    for groups, rms_norm in ((1, False), (2, True)):
        shape = TinyShape(
            layers=2, hidden=256, heads=8, kv_heads=2, head_dim=64, ffn=512, vocab=1024,
            mamba_heads=8, mamba_head_dim=64, mamba_groups=groups, d_state=64, chunk=64,
            rms_norm=rms_norm,
        )
        hf = build_hf_model(shape, MULTIPLIERS_0_5B).to(device)
        config = megatron_config(shape, MULTIPLIERS_0_5B)
        mg = build_megatron_model(shape, config).to(device)
        mg.load_state_dict(hf_to_megatron_state_dict(hf.state_dict(), shape), strict=False)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, shape.vocab, (2, args.seq_len), generator=g).to(device)
        positions = torch.arange(args.seq_len, device=device).unsqueeze(0).expand(2, -1)
        record = {
            "n_groups": groups,
            "mamba_rms_norm": rms_norm,
            "seq_len": args.seq_len,
            "megatron_uses_kernels": mamba2_dispatch.HAVE_MAMBA_SSM_KERNELS,
        }
        # fp32: logits and gradients.
        hf_logits = hf(input_ids=tokens).logits
        mg_logits = mg(input_ids=tokens, position_ids=positions, attention_mask=None)
        record["fp32_logits_max_abs_diff"] = (hf_logits - mg_logits).abs().max().item()
        weights = torch.randn(hf_logits.shape, generator=g).to(device)
        (hf_logits * weights).sum().backward()
        (mg_logits * weights).sum().backward()
        hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
        mapped = hf_to_megatron_state_dict(hf_grads, shape)
        worst = 0.0
        for name, p in mg.named_parameters():
            ref = mapped[name]
            rel = ((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, rel)
        record["fp32_grad_max_rel_diff"] = worst
        # bf16: logits only.
        hf_bf16 = hf.to(torch.bfloat16)
        mg_bf16 = mg.to(torch.bfloat16)
        with torch.no_grad():
            hf_b = hf_bf16(input_ids=tokens).logits.float()
            mg_b = mg_bf16(input_ids=tokens, position_ids=positions, attention_mask=None).float()
        scale = hf_logits.abs().max().item()
        record["bf16_logits_max_abs_diff"] = (hf_b - mg_b).abs().max().item()
        record["bf16_logits_max_rel_to_scale"] = record["bf16_logits_max_abs_diff"] / scale
        record["bf16_hf_vs_fp32_hf_rel_to_scale"] = (hf_b - hf_logits).abs().max().item() / scale
        record["pass"] = (
            record["fp32_logits_max_abs_diff"] <= FP32_LOGITS_ATOL
            and record["fp32_grad_max_rel_diff"] <= 1e-3
            and record["bf16_logits_max_rel_to_scale"] <= BF16_LOGITS_REL
        )
        cases.append(record)
        print(json.dumps(record))
    report = {
        "check": "falcon_h1_hf_parity",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _versions(),
        "command": " ".join(sys.argv),
        "tolerances": {
            "fp32_logits_atol": FP32_LOGITS_ATOL,
            "fp32_grad_rel": 1e-3,
            "bf16_logits_rel_to_scale": BF16_LOGITS_REL,
        },
        "cases": cases,
        "pass": all(c["pass"] for c in cases),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"pass={report['pass']} -> {args.out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
