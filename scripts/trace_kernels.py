#!/usr/bin/env python3
"""The long kernels of a profiled training step, per kernel name and launch grid
(``gpu_trace.long_kernel_launches``), from a kept profiler trace: e.g. the passes of the loss
over the [tokens, vocabulary] logits, which share one grid.

Runs on any machine (it reads the trace, not the GPU); the report records this analysis's
provenance and the benchmark file the trace came from.

    python3 scripts/trace_kernels.py results/h200/falcon_h1/traces/TRACE.json.gz \\
        --source results/h200/falcon_h1/BENCH.json --out REPORT.json [--min-us 150]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
from gpu_trace import (  # noqa: E402
    load_trace,
    long_kernel_launches,
    trace_report_header,
    trace_report_parser,
)


def main(argv: Optional[list[str]] = None) -> int:
    parser = trace_report_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--min-us", type=float, default=150.0, help="shorter kernels are left out")
    args = parser.parse_args(argv)
    rows = long_kernel_launches(load_trace(args.trace), args.min_us)
    argv = sys.argv if argv is None else [__file__, *argv]
    report = {
        **trace_report_header(argv, args.trace, args.source),
        "min_us": args.min_us,
        "kernels": rows,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in rows:
        print(f"{r['us_per_step'] / 1e3:7.3f} ms/step {r['calls_per_step']:5.1f} x {r['mean_us']:8.1f} us "
              f"grid {r['grid']:>16}  {r['name'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
