"""Read a torch profiler chrome trace: how busy the GPU was during the profiled steps.

``gpu_busy_fraction(trace)`` = (union of the GPU activity intervals: kernels, memcpy, memset)
/ (wall time of the profiled steps, from the first ``ProfilerStep#`` start to the last one's
end), with activity clipped to that window. Overlapping kernels (several streams) count once.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_trace(path: Path) -> dict:
    """A chrome trace (``.json`` or ``.json.gz``)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return json.loads(raw)


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total = 0.0
    end = float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def step_window(events: list[dict]) -> tuple[float, float, int]:
    """(start, end, number of steps) of the host's ``ProfilerStep#N`` annotations.

    Recent torch versions also put a copy of each annotation on the GPU track (category
    ``gpu_user_annotation``); those are not steps of their own.
    """
    steps = [
        e
        for e in events
        if e.get("ph") == "X"
        and str(e.get("name", "")).startswith("ProfilerStep#")
        and e.get("cat") != "gpu_user_annotation"  # torch also draws each step on the GPU track
    ]
    if not steps:
        raise ValueError("trace has no ProfilerStep# events (was the profiler given a schedule?)")
    start = min(float(e["ts"]) for e in steps)
    end = max(float(e["ts"]) + float(e["dur"]) for e in steps)
    return start, end, len({e["name"] for e in steps})


def gpu_busy_fraction(trace: dict) -> dict:
    """``{busy_fraction, window_us, busy_us, steps, kernels}`` of a profiler trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    start, end, steps = step_window(events)
    intervals = []
    kernels = 0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATEGORIES:
            continue
        lo, hi = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        lo, hi = max(lo, start), min(hi, end)
        if hi > lo:
            intervals.append((lo, hi))
            kernels += e.get("cat") == "kernel"
    busy = _union_length(intervals)
    window = end - start
    return {
        "busy_fraction": busy / window if window > 0 else 0.0,
        "window_us": window,
        "busy_us": busy,
        "steps": steps,
        "kernels": kernels,
    }


def kernel_names(trace: dict) -> set[str]:
    """Names of every GPU kernel in the trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {str(e.get("name")) for e in events if e.get("cat") == "kernel"}


def top_kernels(trace: dict, count: int = 25) -> list[dict]:
    """The kernels with the most total GPU time in the profiled steps."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    start, end, steps = step_window(events)
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "kernel" or e.get("ph") != "X":
            continue
        if not start <= float(e["ts"]) <= end:
            continue
        entry = totals.setdefault(str(e.get("name")), [0.0, 0])
        entry[0] += float(e.get("dur", 0.0))
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
    return [
        {"name": name[:160], "us_per_step": t / steps, "calls_per_step": n / steps}
        for name, (t, n) in ranked
    ]


def long_kernel_launches(trace: dict, min_us: float) -> list[dict]:
    """Kernels of the profiled steps whose mean duration is at least ``min_us``, per kernel name
    and launch grid (the grid tells passes over one large tensor, e.g. the logits, from others):
    calls and microseconds per step, longest first."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    start, end, steps = step_window(events)
    totals: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") != "kernel" or e.get("ph") != "X" or not start <= float(e["ts"]) <= end:
            continue
        key = (str(e.get("name")), str((e.get("args") or {}).get("grid")))
        entry = totals.setdefault(key, [0.0, 0])
        entry[0] += float(e.get("dur", 0.0))
        entry[1] += 1
    rows = [
        {
            "name": name[:160],
            "grid": grid,
            "mean_us": t / n,
            "us_per_step": t / steps,
            "calls_per_step": n / steps,
        }
        for (name, grid), (t, n) in totals.items()
        if t / n >= min_us
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


HOST_CATEGORIES = ("python_function", "cpu_op")


def host_hotspots(trace: dict, count: int = 40) -> dict[str, list[dict]]:
    """Where the host spends a profiled step: per host event category (Python functions, which
    need ``with_stack``, and torch ops), the names with the most *inclusive* time per step inside
    the profiled steps' window (a function's time contains its callees', so rows nest; events of
    every thread count, the autograd engine's backward thread included)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    start, end, steps = step_window(events)
    out: dict[str, list[dict]] = {}
    for category in HOST_CATEGORIES:
        totals: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") != category or e.get("ph") != "X":
                continue
            if not start <= float(e["ts"]) <= end:
                continue
            entry = totals.setdefault(str(e.get("name"))[:160], [0.0, 0])
            entry[0] += float(e.get("dur", 0.0))
            entry[1] += 1
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
        out[category] = [
            {"name": name, "us_per_step": t / steps, "calls_per_step": n / steps}
            for name, (t, n) in ranked
        ]
    return out


def idle_by_host_function(
    trace: dict,
    prefix: str = "megatron/",
    min_gap_us: float = 50.0,
    categories: tuple[str, ...] = ("python_function",),
) -> dict:
    """What the host was doing while the GPU idled: every gap of at least ``min_gap_us`` between
    GPU activity inside the profiled steps is charged to the innermost host event of
    ``categories`` (default: Python functions, which need ``with_stack``; a trace without stacks
    has ``cpu_op``, ``user_annotation`` and ``cuda_runtime`` events) whose name contains
    ``prefix`` and that runs at the gap's start, or to ``"(none)"``.
    ``{idle_us_per_step, gaps_per_step, by_function: [{name, us_per_step}]}``."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    start, end, steps = step_window(events)
    busy = sorted(
        (max(float(e["ts"]), start), min(float(e["ts"]) + float(e.get("dur", 0.0)), end))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
    )
    gaps, cursor = [], start
    for lo, hi in busy:
        if hi <= lo:
            continue
        if lo - cursor >= min_gap_us:
            gaps.append((cursor, lo - cursor))
        cursor = max(cursor, hi)
    if end - cursor >= min_gap_us:
        gaps.append((cursor, end - cursor))
    functions = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name"))[:160])
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in categories
        and prefix in str(e.get("name"))
        and not str(e.get("name")).startswith("ProfilerStep#")
    )
    # One sweep: the gaps come in time order, so the events running at a gap's start are those
    # already started and not yet ended. Testing every event against every gap grows with their
    # product: 44 s for 18k gaps and 136k events here, 0.14 s this way (on an H100 the benchmark
    # had not reported HF's host-bound 1.5B-Deep run when its 560 s step limit ran out, though the
    # run's worker had finished).
    totals: dict[str, float] = {}
    running: list[tuple[float, float, str]] = []
    upcoming = 0
    for at, length in gaps:
        while upcoming < len(functions) and functions[upcoming][0] <= at:
            running.append(functions[upcoming])
            upcoming += 1
        running = [f for f in running if f[1] >= at]
        covering = [(hi - lo, name) for lo, hi, name in running]
        name = min(covering)[1] if covering else "(none)"
        totals[name] = totals.get(name, 0.0) + length
    return {
        "idle_us_per_step": sum(length for _, length in gaps) / steps,
        "gaps_per_step": len(gaps) / steps,
        "by_function": [
            {"name": name, "us_per_step": t / steps}
            for name, t in sorted(totals.items(), key=lambda kv: -kv[1])
        ],
    }


def trace_report_parser(description: str):
    """Command line of a script that reports on a kept trace: the trace, ``--source`` (the
    benchmark JSON it belongs to) and ``--out`` (the JSON report)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("trace", type=Path, help="a torch profiler trace (.json or .json.gz)")
    parser.add_argument("--source", type=Path, required=True, help="the benchmark JSON it belongs to")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    return parser


def trace_report_header(argv: list[str], trace_path: Path, source_path: Path) -> dict:
    """The head of a report about a kept trace: this analysis's provenance (``argv``: its
    command), the trace, and the benchmark file it came from (that run's commit and device)."""
    from provenance import provenance  # scripts/lib, beside this module

    source = json.loads(source_path.read_text())
    return {
        **provenance(argv),
        "trace": str(trace_path),
        "trace_source": {
            "file": str(source_path),
            **{k: source[k] for k in ("commit", "dirty", "device", "date_utc") if k in source},
        },
    }
