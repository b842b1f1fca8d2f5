#!/usr/bin/env python3
"""Host (CPU) cost of issuing BitNet linear fwd+bwd on a GPU: per-op timings and a cProfile.

Small GEMMs (``--tokens`` 256 by default) keep the GPU ahead of the host, so the numbers are
the Python + launch cost a training step pays per linear. Writes ``profile_bitnet_host.txt``.

    python scripts/gpu/profile_bitnet_host.py --out-dir OUT [--tokens 256] [--k 1024 --n 1536]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--reps", type=int, default=300)
    a = p.parse_args()
    import torch
    import torch.nn.functional as F

    from megatron.core.bitnet import functional as BF
    from megatron.core.bitnet import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    x = (torch.randn(a.tokens, a.k, device=dev) * 2).to(dt).requires_grad_(True)
    w = torch.nn.Parameter((torch.randn(a.n, a.k, device=dev) * 0.02).to(dt))
    dy = torch.randn(a.tokens, a.n, device=dev).to(dt)
    cache = BF.BitNetWeightCache()
    wq = BF.get_quantized_weight(w, cache=cache)
    q, g, s = tk.act_quant(x)
    ops = {
        "bf16 F.linear fwd+bwd": lambda: F.linear(x, w).backward(dy),
        "bitnet_linear fwd+bwd": lambda: BF.bitnet_linear(x, w, weight_cache=cache).backward(dy),
        "bitnet_linear fwd": lambda: BF.bitnet_linear(x, w, weight_cache=cache),
        "torch.matmul": lambda: torch.matmul(dy, w),
        "torch.empty": lambda: torch.empty(a.tokens, a.k, device=dev, dtype=dt),
        "tk.act_quant": lambda: tk.act_quant(x),
        "tk.bitnet_fwd": lambda: tk.bitnet_fwd(q, s, wq.t, wq.beta, dt),
        "tk.weight_dequant": lambda: tk.weight_dequant(wq.t, wq.beta, dt),
        "tk.act_dequant": lambda: tk.act_dequant(q, s, dt),
        "get_quantized_weight (hit)": lambda: BF.get_quantized_weight(w, cache=cache),
        "resolve_backend": lambda: BF.resolve_backend(x),
    }
    prov = provenance(sys.argv)
    lines = [f"device {prov['device']}, torch {torch.__version__}, "
             f"tokens {a.tokens}, K {a.k}, N {a.n}",
             f"commit {prov['commit']} (dirty: {prov['dirty']}), {prov['date_utc']}, "
             f"command: {prov['command']}", "", "host us per call (median of 5 x reps):"]
    for name, fn in ops.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        meds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(a.reps):
                fn()
            meds.append((time.perf_counter() - t0) / a.reps * 1e6)
            torch.cuda.synchronize()
        meds.sort()
        lines.append(f"  {name:32s} {meds[2]:8.1f}")
        x.grad = None
        w.grad = None
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.reps):
        BF.bitnet_linear(x, w, weight_cache=cache).backward(dy)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
    lines += ["", f"cProfile of {a.reps} bitnet_linear fwd+bwd (tottime):", buf.getvalue()]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "profile_bitnet_host.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
