#!/usr/bin/env python3
"""Where a profiled training step leaves the GPU idle: GPU gaps charged to the Megatron Python
function the host was in (``gpu_trace.idle_by_host_function``), from a kept profiler trace.

Runs on any machine (it reads the trace, not the GPU); the report records this analysis's
provenance and the benchmark file the trace came from.

    python3 scripts/trace_idle.py results/h200/falcon_h1/traces/TRACE.json.gz \\
        --source results/h200/falcon_h1/BENCH.json --out results/h200/falcon_h1/trace_idle_X.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
from gpu_trace import (  # noqa: E402
    idle_by_host_function,
    load_trace,
    trace_report_header,
    trace_report_parser,
)


def main(argv: Optional[list[str]] = None) -> int:
    parser = trace_report_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--min-gap-us", type=float, default=50.0, help="shorter gaps are left out")
    args = parser.parse_args(argv)
    argv = sys.argv if argv is None else [__file__, *argv]
    report = {
        **trace_report_header(argv, args.trace, args.source),
        "min_gap_us": args.min_gap_us,
        **idle_by_host_function(load_trace(args.trace), min_gap_us=args.min_gap_us),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['idle_us_per_step'] / 1e3:.1f} ms idle per step; report {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
