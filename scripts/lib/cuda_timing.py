"""GPU timing helpers shared by the micro-benchmarks under ``scripts/gpu/``.

:func:`graphed` captures a step in a CUDA graph the way Megatron's graphs do (warm-up on a side
stream, then capture), so a benchmark times replays without host launch cost;
:func:`median_ms` times any callable with CUDA events.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable


def graphed(step: Callable[[], Any], warmup: int = 3) -> tuple[Callable[[], None], Any]:
    """``step`` run ``warmup`` times on a side stream, then captured in a CUDA graph.

    Returns the graph's replay and what ``step`` returned during capture (its static outputs,
    refreshed by every replay).
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph.replay, static


def median_ms(step: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of ``step`` over ``iters`` calls (CUDA events), after ``warmup``."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
