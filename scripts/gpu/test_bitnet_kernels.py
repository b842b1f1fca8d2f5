#!/usr/bin/env python3
# Copyright (c) 2026, falcon-mcore authors. All rights reserved.
"""Standalone GPU correctness run for the BitNet Triton kernels.

Checks every kernel against the pure-torch reference on the same GPU:

* activation / weight quantisation: bit-identical Q, gamma, T, beta*T (incl. ties, external
  scales, the two-pass long-row path); beta equality (fp64 sums, different order);
* forward GEMM: raw int32 accumulator bit-identical to ``torch._int_mm`` (int32 reference) and
  the scaled output bit-identical to the torch path;
* dgrad / wgrad (incl. fp32 main_grad accumulation): relative error vs an fp32 reference of
  the exact STE formula, compared with the error of a bf16 cuBLAS reference;
* bitnet_linear end to end (triton vs torch backend; every dgrad / wgrad GEMM choice);
* per-output-row (vector) beta: row abs sums / segment betas, weight quantisation, forward
  GEMM (bit-identical), dgrad, and bitnet_linear end to end.

Writes a JSON report (device, versions, date, command, per-check results) to ``--out`` and
exits non-zero if any check fails.

Usage::

    python scripts/gpu/test_bitnet_kernels.py --out bitnet_kernels.json [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from project_paths import use  # noqa: E402
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)


def _import_bitnet():
    try:
        return importlib.import_module("megatron.core.bitnet")
    except ImportError:
        use("overlay")
        importlib.invalidate_caches()
        return importlib.import_module("megatron.core.bitnet")


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller shapes and no autotuning (BITNET_TRITON_AUTOTUNE=0)",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="token count M (default 8192, quick 1024)"
    )
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


class Checker:
    """Collects named checks; an exception inside a check is a failure, not a crash."""

    def __init__(self):
        self.results = []

    def run(self, name, fn, **meta):
        t0 = time.time()
        try:
            passed, detail = fn()
        except Exception as exc:  # report and continue with the other checks
            passed, detail = False, {"error": repr(exc), "traceback": traceback.format_exc()}
        rec = {"name": name, "passed": bool(passed), "seconds": round(time.time() - t0, 3)}
        rec.update(meta)
        rec["detail"] = detail
        self.results.append(rec)
        status = "PASS" if passed else "FAIL"
        short = {k: v for k, v in detail.items() if k != "traceback"} if detail else {}
        print(f"[{status}] {name} {meta if meta else ''} {short}", flush=True)
        return passed


def main() -> int:
    args = _parse()
    if args.quick:
        os.environ["BITNET_TRITON_AUTOTUNE"] = "0"
    import torch

    if not torch.cuda.is_available():
        print("ERROR: no CUDA device visible; this script needs a GPU.", file=sys.stderr)
        return 2
    bitnet = _import_bitnet()
    from megatron.core.bitnet import functional as BF
    from megatron.core.bitnet import quant as Q

    if not BF.triton_available():
        print(
            f"ERROR: Triton kernels failed to import: {BF._TRITON_IMPORT_ERROR!r}", file=sys.stderr
        )
        return 2
    from megatron.core.bitnet import triton_kernels as tk

    if tk.interpret_mode():
        print("ERROR: TRITON_INTERPRET is set; unset it for the GPU run.", file=sys.stderr)
        return 2

    dev = torch.device("cuda")
    torch.manual_seed(args.seed)
    m_tokens = args.tokens or (1024 if args.quick else 8192)
    shapes_nk = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    if args.quick:
        shapes_nk = [(768, 512), (512, 1792), (1000, 520)]
    ck = Checker()
    bf16 = torch.bfloat16

    def poison(shape, dtype):
        """Fill (then free) a block of the output's size so an unwritten output shows."""
        if dtype.is_floating_point:
            buf = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        else:
            buf = torch.full(shape, 99, dtype=dtype, device=dev)
        del buf

    def rel_err(out, ref):
        out = out.double()
        ref = ref.double()
        if not torch.isfinite(out).all():
            return float("inf")
        return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    # ---------------------------------------------------------------- activation quant
    act_shapes = [(m_tokens, 4096), (m_tokens, 14336), (257, 20000), (3, 7, 100)]
    for shape in act_shapes:
        for dtype in (bf16, torch.float32):

            def f_act(shape=shape, dtype=dtype):
                x = (torch.randn(shape, device=dev) * 3).to(dtype)
                x.view(-1, shape[-1])[0].zero_()
                poison((x.numel(),), torch.int8)
                q, g, s = tk.act_quant(x)
                q_ref, g_ref = Q.quantize_activation(x.reshape(-1, shape[-1]))
                # also against the CPU torch path (cross-device reference)
                q_cpu, g_cpu = Q.quantize_activation(x.reshape(-1, shape[-1]).cpu())
                gam = tk.act_absmax(x)
                ok = (
                    torch.equal(q, q_ref)
                    and torch.equal(g, g_ref)
                    and torch.equal(q.cpu(), q_cpu)
                    and torch.equal(g.cpu(), g_cpu)
                    and torch.equal(gam, g_ref)
                    and torch.equal(s.cpu(), Q.activation_dequant_scale(g_cpu))
                    and torch.equal(Q.activation_dequant_scale(g_ref).cpu(), g_cpu / 127.0)
                )
                n_bad = int((q != q_ref).sum())
                return ok, {"mismatched_q": n_bad}

            ck.run("act_quant_bit_identical", f_act, shape=list(shape), dtype=str(dtype))

    def f_act_ext():
        x = torch.randn(m_tokens, 4096, device=dev, dtype=bf16) * 2
        gam = Q.activation_absmax(x) * torch.linspace(0.25, 2, m_tokens, device=dev)
        q, _, _ = tk.act_quant(x, gam)
        q_ref, _ = Q.quantize_activation(x, gam)
        return torch.equal(q, q_ref), {"mismatched_q": int((q != q_ref).sum())}

    ck.run("act_quant_external_gamma", f_act_ext)

    def f_ties():
        x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5]], device=dev)
        q, _, _ = tk.act_quant(x.to(bf16))
        exp = [[127, 0, 2, 2, 0, -2, -2, 4, 126, -126]]
        w = torch.tensor([[0.5, -0.5, 1.5, -1.5]] * 2, device=dev)
        t, _ = tk.weight_quant(w, Q.weight_scale(w))
        ok = q.cpu().tolist() == exp and t.cpu().tolist() == [[0, 0, 1, -1]] * 2
        return ok, {"q": q.cpu().tolist(), "t": t.cpu().tolist()}

    ck.run("round_half_even_ties", f_ties)

    # ---------------------------------------------------------------- weight quant
    for n, k in shapes_nk:
        for dtype in (bf16, torch.float32):

            def f_w(n=n, k=k, dtype=dtype):
                w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
                s_tri = tk.weight_abs_sum(w)
                s_ref = Q.weight_abs_sum(w)
                beta_tri = Q.weight_scale_from_abs_sum(s_tri, w.numel())
                t_ref, beta_ref = Q.quantize_weight(w)
                poison((n, k), torch.int8)
                t, dense = tk.weight_quant(w, beta_ref, dense_dtype=bf16)
                dense_ref = Q.dequantize_weight(t_ref, beta_ref, bf16)
                t_cpu, beta_cpu = Q.quantize_weight(w.cpu())
                detail = {
                    "abs_sum_rel_diff": abs((s_tri - s_ref).item()) / s_ref.item(),
                    "beta_equal_torch_cuda": bool(torch.equal(beta_tri, beta_ref)),
                    "beta_equal_torch_cpu": bool(torch.equal(beta_tri.cpu(), beta_cpu)),
                    "mismatched_t": int((t != t_ref).sum()),
                }
                poison((n, k), bf16)
                deq = tk.weight_dequant(t_ref, beta_ref, bf16)
                detail["weight_dequant_bit_identical"] = bool(torch.equal(deq, dense_ref))
                ok = (
                    torch.equal(t, t_ref)
                    and torch.equal(dense, dense_ref)
                    and detail["weight_dequant_bit_identical"]
                    and detail["abs_sum_rel_diff"] < 1e-12
                    and detail["beta_equal_torch_cuda"]
                )
                if detail["beta_equal_torch_cpu"]:
                    ok = ok and torch.equal(t.cpu(), t_cpu)
                return ok, detail

            ck.run("weight_quant_bit_identical", f_w, shape=[n, k], dtype=str(dtype))

    # ---------------------------------------------------------------- forward GEMM
    for n, k in shapes_nk:

        def f_fwd(n=n, k=k):
            x = torch.randn(m_tokens, k, device=dev, dtype=bf16) * 2
            w = torch.randn(n, k, device=dev, dtype=bf16) * 0.02
            q, g = Q.quantize_activation(x)
            t, beta = Q.quantize_weight(w)
            q[0] = -128
            t[0] = -1
            # raw int32 accumulator: s = 1, beta = 1, fp32 output is exact for |acc| < 2**24
            ones = torch.ones(m_tokens, device=dev)
            one = torch.ones((), device=dev)
            poison((m_tokens, n), torch.float32)
            acc = tk.bitnet_fwd(q, ones, t, one, torch.float32)
            detail = {}
            ok = True
            if m_tokens > 16 and k % 8 == 0 and n % 8 == 0:
                acc_ref = torch._int_mm(q, t.t())
                same = torch.equal(acc, acc_ref.float())
                detail["int32_acc_equal_int_mm"] = bool(same)
                ok = ok and same
            acc_ref2 = Q.int_matmul_exact(q, t)
            same2 = torch.equal(acc, acc_ref2.float())
            detail["int32_acc_equal_torch_path"] = bool(same2)
            ok = ok and same2
            for od in (bf16, torch.float32):
                poison((m_tokens, n), od)
                y = tk.bitnet_fwd(q, Q.activation_dequant_scale(g), t, beta, od)
                y_ref = Q.scaled_int_matmul(q, g, t, beta, od)
                eq = torch.equal(y, y_ref)
                detail[f"y_{str(od).split('.')[-1]}_bit_identical"] = bool(eq)
                ok = ok and eq
            return ok, detail

        ck.run("fwd_gemm_exact", f_fwd, shape=[m_tokens, n, k])

    # ---------------------------------------------------------------- dgrad / wgrad
    for n, k in shapes_nk:

        def f_dgrad(n=n, k=k):
            dy = torch.randn(m_tokens, n, device=dev, dtype=bf16)
            t, beta = Q.quantize_weight(torch.randn(n, k, device=dev) * 0.02)
            ref = (dy.float() @ t.float()) * beta  # fp32 truth of dY @ (beta*T)
            poison((m_tokens, k), bf16)
            dx = tk.bitnet_dgrad(dy, t, beta)
            cublas = dy @ Q.dequantize_weight(t, beta, bf16)
            e_ours, e_cublas = rel_err(dx, ref), rel_err(cublas, ref)
            ok = e_ours < 1e-2 and e_ours <= max(1.5 * e_cublas, 5e-3)
            return ok, {"rel_err": e_ours, "rel_err_cublas_bf16": e_cublas}

        ck.run("dgrad", f_dgrad, shape=[m_tokens, n, k])

        def f_wgrad(n=n, k=k):
            dy = torch.randn(m_tokens, n, device=dev, dtype=bf16)
            q, g = Q.quantize_activation(torch.randn(m_tokens, k, device=dev) * 2)
            sc = Q.activation_dequant_scale(g)
            xq = Q.dequantize_activation(q, g, bf16)
            ref = dy.float().t() @ xq.float()
            poison((n, k), bf16)
            dw = tk.bitnet_wgrad(dy, q, sc)
            cublas = dy.t() @ xq
            e_ours, e_cublas = rel_err(dw, ref), rel_err(cublas, ref)
            mg0 = torch.randn(n, k, device=dev) * 0.01
            mg = mg0.clone()
            tk.bitnet_wgrad(dy, q, sc, main_grad=mg)
            e_mg = rel_err(mg - mg0, ref)
            # the cuBLAS fp32-output accumulation used by the default path
            mg2 = mg0.clone()
            BF._accumulate_mm(mg2, dy.t(), xq)
            e_mg_cublas = rel_err(mg2 - mg0, ref)
            ok = (
                e_ours < 1e-2
                and e_ours <= max(1.5 * e_cublas, 5e-3)
                and e_mg < 1e-4
                and e_mg_cublas < 1e-4
            )
            return ok, {
                "rel_err": e_ours,
                "rel_err_cublas_bf16": e_cublas,
                "rel_err_main_grad_fp32": e_mg,
                "rel_err_main_grad_fp32_cublas": e_mg_cublas,
                "addmm_out_dtype_supported": BF._ADDMM_OUT_DTYPE_OK,
            }

        ck.run("wgrad", f_wgrad, shape=[m_tokens, n, k])

    # ---------------------------------------------------------------- per-row (vector) beta
    def seg_ids(n):
        """Three contiguous row segments (like q / k / v or gate / up of a fused weight)."""
        return (torch.arange(n, device=dev) * 3 // n).to(torch.long)

    def seg_beta(w, ids, rows):
        counts = [int((ids == s).sum()) * w.shape[1] for s in range(3)]
        sums = Q.segment_sums(rows, ids, 3)
        return Q.expand_segment_scales(Q.weight_scale_from_abs_sum(sums, counts), ids)

    for n, k in shapes_nk:
        for dtype in (bf16, torch.float32):

            def f_wv(n=n, k=k, dtype=dtype):
                # q / k / v-like segments of different magnitudes
                ids = seg_ids(n)
                mag = torch.tensor([0.02, 0.05, 0.1], device=dev)[ids][:, None]
                w = (torch.randn(n, k, device=dev) * mag).to(dtype)
                rows_tri = tk.weight_row_abs_sums(w)
                rows_ref = Q.weight_row_abs_sums(w)
                rel = ((rows_tri - rows_ref).abs() / rows_ref.clamp_min(1e-300)).max().item()
                beta_tri = seg_beta(w, ids, rows_tri)
                beta_ref = seg_beta(w, ids, rows_ref)
                detail = {
                    "row_abs_sum_max_rel_diff": rel,
                    "beta_equal": bool(torch.equal(beta_tri, beta_ref)),
                }
                ok = rel < 1e-12 and detail["beta_equal"]
                rand_beta = torch.rand(n, device=dev) * 0.05 + 1e-3  # not piecewise constant
                for name, beta in (("segments", beta_ref), ("random_rows", rand_beta)):
                    t_ref, _ = Q.quantize_weight(w, beta)
                    poison((n, k), torch.int8)
                    t, dense = tk.weight_quant(w, beta, dense_dtype=bf16)
                    dense_ref = Q.dequantize_weight(t_ref, beta, bf16)
                    poison((n, k), bf16)
                    deq = tk.weight_dequant(t_ref, beta, bf16)
                    same = (
                        torch.equal(t, t_ref)
                        and torch.equal(dense, dense_ref)
                        and torch.equal(deq, dense_ref)
                    )
                    detail[f"{name}_t_and_dense_bit_identical"] = bool(same)
                    detail[f"{name}_mismatched_t"] = int((t != t_ref).sum())
                    ok = ok and same
                return ok, detail

            ck.run("weight_quant_vector_beta", f_wv, shape=[n, k], dtype=str(dtype))

        def f_fwdv(n=n, k=k):
            x = torch.randn(m_tokens, k, device=dev, dtype=bf16) * 2
            w = torch.randn(n, k, device=dev, dtype=bf16) * 0.02
            beta = torch.rand(n, device=dev) * 0.05 + 1e-3
            q, g = Q.quantize_activation(x)
            t, beta = Q.quantize_weight(w, beta)
            q[0] = -128
            t[0] = -1
            detail, ok = {}, True
            for od in (bf16, torch.float32):
                poison((m_tokens, n), od)
                y = tk.bitnet_fwd(q, Q.activation_dequant_scale(g), t, beta, od)
                y_ref = Q.scaled_int_matmul(q, g, t, beta, od)
                eq = torch.equal(y, y_ref)
                detail[f"y_{str(od).split('.')[-1]}_bit_identical"] = bool(eq)
                ok = ok and eq
            return ok, detail

        ck.run("fwd_gemm_vector_beta_exact", f_fwdv, shape=[m_tokens, n, k])

        def f_dgradv(n=n, k=k):
            dy = torch.randn(m_tokens, n, device=dev, dtype=bf16)
            beta = torch.rand(n, device=dev) * 0.05 + 1e-3
            t, beta = Q.quantize_weight(torch.randn(n, k, device=dev) * 0.02, beta)
            ref = dy.float() @ (t.float() * beta[:, None])  # fp32 truth of dY @ (beta*T)
            poison((m_tokens, k), bf16)
            dx = tk.bitnet_dgrad(dy, t, beta)
            cublas = dy @ Q.dequantize_weight(t, beta, bf16)
            e_ours, e_cublas = rel_err(dx, ref), rel_err(cublas, ref)
            ok = e_ours < 1e-2 and e_ours <= max(1.5 * e_cublas, 5e-3)
            return ok, {"rel_err": e_ours, "rel_err_cublas_bf16": e_cublas}

        ck.run("dgrad_vector_beta", f_dgradv, shape=[m_tokens, n, k])

    for dimpl, wimpl in (("cublas", "cublas"), ("cublas_cached", "cublas"), ("triton", "triton")):

        def f_e2ev(dimpl=dimpl, wimpl=wimpl):
            s, b, h, n = 8, max(1, m_tokens // 8 // 4), 1024, 768
            ids = seg_ids(n)
            x0 = torch.randn(s, b, h, device=dev, dtype=bf16) * 2
            w0 = torch.randn(n, h, device=dev, dtype=bf16) * 0.02
            dy = torch.randn(s, b, n, device=dev, dtype=bf16)
            out = {}
            for be in ("triton", "torch"):
                x = x0.clone().requires_grad_(True)
                w = torch.nn.Parameter(w0.clone())
                w.main_grad = torch.zeros(n, h, device=dev)
                rows = BF.weight_row_abs_sums(w, backend=be)
                beta = seg_beta(w, ids, rows)
                y = BF.bitnet_linear(
                    x,
                    w,
                    weight_scale=beta,
                    gradient_accumulation_fusion=True,
                    backend=be,
                    dgrad=dimpl,
                    wgrad=wimpl,
                )
                y.backward(dy)
                out[be] = (beta, y.detach(), x.grad, w.main_grad)
            beta = out["torch"][0]
            q, g = Q.quantize_activation(x0.reshape(-1, h))
            t, _ = Q.quantize_weight(w0, beta)
            xq = q.float() * Q.activation_dequant_scale(g)[:, None]
            wq = t.float() * beta[:, None]
            gx_ref = dy.reshape(-1, n).float() @ wq
            gw_ref = dy.reshape(-1, n).float().t() @ xq
            d = {
                "beta_equal": bool(torch.equal(out["triton"][0], beta)),
                "y_bit_identical": bool(torch.equal(out["triton"][1], out["torch"][1])),
                "grad_x_rel_err": rel_err(out["triton"][2].reshape(-1, h), gx_ref),
                "main_grad_rel_err": rel_err(out["triton"][3], gw_ref),
            }
            ok = (
                d["beta_equal"]
                and d["y_bit_identical"]
                and d["grad_x_rel_err"] < 1e-2
                and d["main_grad_rel_err"] < 1e-2
            )
            return ok, d

        ck.run("bitnet_linear_vector_beta_e2e", f_e2ev, dgrad=dimpl, wgrad=wimpl)

    # ---------------------------------------------------------------- end to end
    for dimpl in ("cublas", "cublas_cached", "triton"):
        for wimpl in ("cublas", "triton"):

            def f_e2e(dimpl=dimpl, wimpl=wimpl):
                s, b, h, n = 8, max(1, m_tokens // 8 // 4), 1024, 768
                x0 = torch.randn(s, b, h, device=dev, dtype=bf16) * 2
                w0 = torch.randn(n, h, device=dev, dtype=bf16) * 0.02
                dy = torch.randn(s, b, n, device=dev, dtype=bf16)
                out = {}
                for be in ("triton", "torch"):
                    x = x0.clone().requires_grad_(True)
                    w = torch.nn.Parameter(w0.clone())
                    w.main_grad = torch.zeros(n, h, device=dev)
                    cache = BF.BitNetWeightCache()
                    gemms = {"backend": be, "dgrad": dimpl, "wgrad": wimpl}
                    y = BF.bitnet_linear(x, w, weight_cache=cache, **gemms)
                    y.backward(dy)
                    y2 = BF.bitnet_linear(
                        x, w, weight_cache=cache, gradient_accumulation_fusion=True, **gemms
                    )
                    y2.backward(dy)
                    out[be] = (y.detach(), x.grad, w.grad, w.main_grad)
                # fp32 STE truth from the same quantisation
                q, g = Q.quantize_activation(x0.reshape(-1, h))
                t, beta = Q.quantize_weight(w0)
                xq = q.float() * Q.activation_dequant_scale(g)[:, None]
                wq = t.float() * beta
                gx_ref = 2 * (dy.reshape(-1, n).float() @ wq)
                gw_ref = dy.reshape(-1, n).float().t() @ xq
                d = {
                    "y_bit_identical": bool(torch.equal(out["triton"][0], out["torch"][0])),
                    "grad_x_rel_err": rel_err(out["triton"][1].reshape(-1, h), gx_ref),
                    "grad_w_rel_err": rel_err(out["triton"][2], gw_ref),
                    "main_grad_rel_err": rel_err(out["triton"][3], gw_ref),
                    "torch_grad_x_rel_err": rel_err(out["torch"][1].reshape(-1, h), gx_ref),
                }
                ok = (
                    d["y_bit_identical"]
                    and d["grad_x_rel_err"] < 1e-2
                    and d["grad_w_rel_err"] < 1e-2
                    and d["main_grad_rel_err"] < 1e-2
                )
                return ok, d

            ck.run("bitnet_linear_e2e", f_e2e, dgrad=dimpl, wgrad=wimpl)

    # ---------------------------------------------------------------- report
    all_ok = all(r["passed"] for r in ck.results)
    n_failed = sum(not r["passed"] for r in ck.results)
    report = {
        "script": "scripts/gpu/test_bitnet_kernels.py",
        **provenance(sys.argv),
        "capability": list(torch.cuda.get_device_capability(0)),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("BITNET_", "TRITON_"))},
        "tokens": m_tokens,
        "quick": args.quick,
        "all_passed": all_ok,
        "n_checks": len(ck.results),
        "n_failed": n_failed,
        "summary": {
            "n_checks": len(ck.results),
            "n_passed": len(ck.results) - n_failed,
            "n_failed": n_failed,
        },
        "results": ck.results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{report['n_checks'] - report['n_failed']}/{report['n_checks']} checks passed; "
        f"report: {out}"
    )
    del bitnet
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
