"""The Falcon-H1 benchmark's CPU-side logic: GPU-busy from a trace, resuming, ratios per call."""

from __future__ import annotations

import os
import json
import statistics
import sys
from pathlib import Path

import pytest
from project_paths import load_script


def _trace():
    """Two profiled steps of 100 us; kernels [10, 30] and [20, 50] overlap (40 us busy), plus
    [150, 170] and a memcpy [180, 190] in step two; a kernel outside the steps is ignored."""
    events = [
        {"ph": "X", "name": "ProfilerStep#7", "ts": 0, "dur": 100, "cat": "user_annotation"},
        {"ph": "X", "name": "ProfilerStep#8", "ts": 100, "dur": 100, "cat": "user_annotation"},
        {"ph": "X", "name": "gemm", "ts": 10, "dur": 20, "cat": "kernel"},
        {"ph": "X", "name": "_chunk_scan_fwd_kernel", "ts": 20, "dur": 30, "cat": "kernel"},
        {"ph": "X", "name": "gemm", "ts": 150, "dur": 20, "cat": "kernel"},
        {"ph": "X", "name": "Memcpy DtoD", "ts": 180, "dur": 10, "cat": "gpu_memcpy"},
        {"ph": "X", "name": "late", "ts": 300, "dur": 50, "cat": "kernel"},
    ]
    return {"traceEvents": events}


def test_gpu_busy_fraction_counts_overlaps_once():
    trace = load_script("scripts/lib/gpu_trace.py")
    busy = trace.gpu_busy_fraction(_trace())
    assert busy["window_us"] == 200 and busy["steps"] == 2
    assert busy["busy_us"] == 40 + 20 + 10
    assert busy["busy_fraction"] == 70 / 200
    assert busy["kernels"] == 3  # the memcpy is busy time, not a kernel; "late" is outside
    top = trace.top_kernels(_trace())
    assert top[0]["name"] == "gemm" and top[0]["us_per_step"] == 20


def test_host_hotspots_rank_inclusive_host_time_per_step(tmp_path):
    """Python functions and torch ops inside the profiled steps, per step, most time first;
    startup outside the steps is left out. A kept trace writes them beside it."""
    trace = load_script("scripts/lib/gpu_trace.py")
    data = _trace()
    data["traceEvents"] += [
        {"ph": "X", "name": "module.py(1): forward", "ts": 5, "dur": 60, "cat": "python_function"},
        {"ph": "X", "name": "module.py(1): forward", "ts": 105, "dur": 80, "cat": "python_function"},
        {"ph": "X", "name": "launch", "ts": 10, "dur": 90, "cat": "python_function"},
        {"ph": "X", "name": "aten::mm", "ts": 12, "dur": 8, "cat": "cpu_op"},
        {"ph": "X", "name": "startup", "ts": -900, "dur": 800, "cat": "python_function"},
    ]
    hot = trace.host_hotspots(data)
    assert [r["name"] for r in hot["python_function"]] == ["module.py(1): forward", "launch"]
    assert hot["python_function"][0] == {
        "name": "module.py(1): forward", "us_per_step": 70.0, "calls_per_step": 1.0
    }
    assert hot["cpu_op"] == [{"name": "aten::mm", "us_per_step": 4.0, "calls_per_step": 0.5}]
    raw = tmp_path / "trace.json"
    raw.write_text(json.dumps(data))
    kept = _bench().keep_trace(raw, data, tmp_path, "c", "s")
    assert (tmp_path / kept).is_file()
    side = json.loads((tmp_path / "traces" / "trace_c_s.host.json").read_text())
    assert side == json.loads(json.dumps(hot))


def test_gpu_track_copies_of_the_step_annotations_are_not_steps():
    """torch puts each ProfilerStep# on the GPU track too; counting those doubled the steps and
    halved every per-step figure (the first H200 results had this defect)."""
    trace = load_script("scripts/lib/gpu_trace.py")
    data = _trace()
    data["traceEvents"] += [
        {"ph": "X", "name": "ProfilerStep#7", "ts": 5, "dur": 100, "cat": "gpu_user_annotation"},
        {"ph": "X", "name": "ProfilerStep#8", "ts": 105, "dur": 120, "cat": "gpu_user_annotation"},
    ]
    busy = trace.gpu_busy_fraction(data)
    assert busy["steps"] == 2 and busy["window_us"] == 200
    top = trace.top_kernels(data)
    assert top[0]["name"] == "gemm" and top[0]["us_per_step"] == 20
    assert top[0]["calls_per_step"] == 1


def _bench():
    return load_script("scripts/gpu/bench_falcon_h1.py")


def test_mamba_path_is_read_from_kernel_names():
    bench = _bench()
    assert bench.mamba_path({"_chunk_scan_fwd_kernel", "causal_conv1d_fwd_kernel"}) == (
        "mamba_ssm Triton SSD kernels + causal_conv1d CUDA"
    )
    assert "torch path" in bench.mamba_path({"gemm"})


def test_resume_only_same_clean_commit_and_device(tmp_path):
    bench = _bench()
    earlier = {
        "commit": "abc", "dirty": False, "device": "NVIDIA H200",
        "cases": {"c": {"systems": {"hf": {"tok_s": 1.0}, "ours": {"error": "boom"}}}},
    }  # fmt: skip
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    now = {"commit": "abc", "dirty": False, "device": "NVIDIA H200"}
    assert bench.resumable(path, now) == {"c": {"hf": {"tok_s": 1.0}}}  # failed runs redone
    # A file without a log interval was timed per step.
    assert bench.resumable(path, dict(now, log_interval=1)) == {"c": {"hf": {"tok_s": 1.0}}}
    for changed in (
        {"commit": "def"}, {"dirty": True}, {"device": "NVIDIA H100"}, {"log_interval": 10},
        {"iters": 50},
    ):  # fmt: skip
        assert bench.resumable(path, dict(now, **changed)) == {}
    assert bench.resumable(None, now) == {}


def test_timing_windows_end_at_log_steps_inside_the_timed_steps():
    bench = _bench()
    # Log interval 1: every step from iters//3 + 2 to iters - 3 (the plan before windows).
    assert bench.timed_windows(16, 1) == [(i, i) for i in range(7, 14)]
    # Interval 10, 50 steps: timed steps 18..47, so the windows 21-30 and 31-40.
    assert bench.timed_windows(50, 10) == [(21, 30), (31, 40)]
    with pytest.raises(SystemExit, match="--iters 40 with --log-interval 10 leaves 1 timed"):
        bench.timed_windows(40, 10)
    times = {1: 900.0, 10: 300.0, 20: 120.0, 30: 101.0, 40: 99.0, 50: 140.0}
    assert bench.window_ms(times, bench.timed_windows(50, 10)) == [101.0, 99.0]


def test_megatron_log_times_are_the_logged_window_means():
    bench = _bench()
    line = (
        " [2026-12-04 22:56:28.665782] iteration {i:>8}/      50 | consumed samples: 16 | "
        "elapsed time per iteration (ms): {ms} | learning rate: 1.000000E-04 | lm loss: 1.0E+01 |"
    )
    text = "\n".join([line.format(i=1, ms="812.5"), "noise", line.format(i=10, ms="101.3")])
    assert bench.megatron_log_times(text) == {1: 812.5, 10: 101.3}


def test_ratios_only_between_runs_of_one_call():
    bench = _bench()
    entry = {
        "systems": {
            "hf": {"tok_s": 100.0, "mfu": 0.1, "call": "A"},
            "ours_te_graph_opt": {"tok_s": 350.0, "mfu": 0.3, "call": "A"},
            "ours_te_graph": {"tok_s": 900.0, "mfu": 0.9, "call": "B"},
            "ours_local": {"error": "exit 1"},
        }
    }
    bench.compare(entry)
    assert entry["systems"]["ours_te_graph_opt"]["over_hf"] == 3.5
    assert "over_hf" not in entry["systems"]["ours_te_graph"]  # another call: not comparable
    assert entry["best_ours"] == "ours_te_graph_opt" and entry["ours_over_hf"] == 3.5


@pytest.mark.parametrize(
    "again,reference,ratio",
    [({"tok_s": 120.0, "mfu": 0.12, "call": "A"}, "hf_again", 3.0),
     ({"tok_s": 90.0, "mfu": 0.09, "call": "A"}, "hf", 3.6),
     ({"tok_s": 200.0, "mfu": 0.2, "call": "B"}, "hf", 3.6),
     ({"error": "not run: --deadline-s reached"}, "hf", 3.6)],
    ids=["faster_again", "slower_again", "again_other_call", "again_not_run"],
)  # fmt: skip
def test_ratios_against_the_faster_plain_hf_run_of_the_call(again, reference, ratio):
    """HF's host-bound step moves between runs: a second plain HF run (hf_again) that finished
    faster in the same call becomes the reference, never a slower or another call's one."""
    bench = _bench()
    entry = {
        "systems": {
            "hf": {"tok_s": 100.0, "mfu": 0.1, "call": "A"},
            "ours_te_graph_opt": {"tok_s": 360.0, "mfu": 0.3, "call": "A"},
            "hf_again": again,
        }
    }
    bench.compare(entry)
    assert entry["hf_reference"] == reference
    assert entry["ours_over_hf"] == pytest.approx(ratio)
    assert entry["systems"]["ours_te_graph_opt"]["over_hf"] == pytest.approx(ratio)
    assert entry["hf_tok_s"] == entry["systems"][reference]["tok_s"]


def test_loss_curves_of_ours_are_compared_within_one_call():
    """Each of our runs against the first of ours in the call: the largest relative difference
    of the logged losses; other calls, failed runs and HF (another initialisation) are left out;
    curves of different lengths are not compared; the markdown names the figures."""
    bench = _bench()
    entry = {
        "tokens_per_step": 8, "flops_per_token": 1e9,
        "systems": {
            "hf": {"tok_s": 1.0, "mfu": 0.1, "call": "A", "losses": [9.0, 8.0]},
            "ours_te_graph_opt": {"tok_s": 3.0, "mfu": 0.3, "call": "A", "losses": [10.0, 8.0, 6.0]},
            "ours_te_graph": {"tok_s": 2.0, "mfu": 0.2, "call": "A", "losses": [10.0, 8.2, 6.0]},
            "ours_te": {"tok_s": 2.0, "mfu": 0.2, "call": "A", "losses": [10.0, 8.0]},
            "ours_local": {"error": "exit 1"},
            "ours_local_graph": {"tok_s": 2.0, "mfu": 0.2, "call": "B", "losses": [1.0, 1.0, 1.0]},
        },
    }  # fmt: skip
    bench.compare(entry)
    assert entry["loss_reference"] == "ours_te_graph_opt"
    assert entry["loss_max_rel_diff"] == {"ours_te_graph": pytest.approx(0.025), "ours_te": None}
    assert bench.max_rel_diff([2.0, 4.0], [2.0, 3.0]) == 0.25
    assert bench.max_rel_diff([2.0, 4.0], [2.0, 4.0]) == 0.0
    for r in entry["systems"].values():
        r.update(median_ms=1.0, peak_allocated_mb=1.0) if "error" not in r else None
    md = bench.markdown({"device": "d", "date_utc": "t", "commit": "c", "versions": {}, "command": "x",
                         "matmul_tflops": 1.0, "cases": {"case": entry}})  # fmt: skip
    assert "Loss curves vs ours_te_graph_opt" in md
    assert "ours_te_graph 2.5e-02; ours_te n/a (other window count)" in md


@pytest.mark.parametrize("exit_code", [0, 1])
def test_megatron_run_is_read_then_its_work_folder_removed(tmp_path, monkeypatch, exit_code):
    """run_ours on a stand-in for torchrun: the log's window times, losses and peak memory and the
    profiler trace are read; the work folder (TensorBoard events, raw trace) is gone afterwards,
    after a failed run too, while the log stays; a kept trace is copied out first."""
    bench = _bench()

    def fake_run(args, cwd, env, stdout, stderr, timeout):
        work = Path(args[args.index("--tensorboard-dir") + 1]).parent
        (work / "torch_profile").mkdir(parents=True)
        (work / "tb").mkdir()
        (work / "torch_profile" / "rank-0.json").write_text(json.dumps(_trace()))
        for i in range(10, 51, 10):
            stdout.write(
                f" [2026] iteration       {i}/      50 | elapsed time per iteration (ms): "
                f"{100.0 + i} | lm loss: {11.0 - i / 100:.6E} |\n"
            )
        stdout.write("[Rank 0] (after 10 iterations) memory (MB) | max allocated: 2048.5 |\n")
        return subprocess.CompletedProcess(args, exit_code)

    import subprocess

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "megatron_flags", lambda case: [])  # needs the patched tree
    result = bench.run_ours(
        "ours_te_graph_opt", "0.5b_s2048_b4", 50, 10, tmp_path, tmp_path, keep=True
    )
    assert not (tmp_path / "work_0.5b_s2048_b4_ours_te_graph_opt").exists()
    assert (tmp_path / "0.5b_s2048_b4_ours_te_graph_opt.log").exists()
    if exit_code:
        assert result["error"].startswith("exit 1")
        return
    windows = bench.timed_windows(50, 10)
    assert result["median_ms"] == statistics.median(100.0 + end for _, end in windows)
    assert result["losses"] == [10.9, 10.8, 10.7, 10.6, 10.5]
    assert result["peak_allocated_mb"] == 2048.5 and result["gpu_busy"] == 70 / 200
    assert (tmp_path / "traces" / "trace_0.5b_s2048_b4_ours_te_graph_opt.json.gz").exists()


_OPTION_STRINGS = """
import json, sys
sys.argv = ["pretrain_mamba.py"]
import megatron.training.arguments as arguments
parser = arguments.argparse.ArgumentParser(allow_abbrev=False)
parser = arguments.add_megatron_arguments(parser)
print("OPTIONS " + json.dumps(sorted(parser._option_string_actions)))
"""


@pytest.mark.megatron
def test_every_system_flag_exists_in_the_patched_tree(megatron_tree):
    """A misspelt flag would only show on the GPU (a failed run after minutes of device time)."""
    import subprocess

    bench = load_script("scripts/gpu/bench_falcon_h1.py")
    proc = subprocess.run(
        [sys.executable, "-c", _OPTION_STRINGS], capture_output=True, text=True, timeout=300,
        cwd=megatron_tree, env={**os.environ, "PYTHONPATH": str(megatron_tree)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OPTIONS "))
    options = set(json.loads(line[len("OPTIONS "):]))
    used = {f for flags, _ in bench.OURS.values() for f in flags if f.startswith("--")}
    assert "--mamba-batch-first" in used
    assert used - options == set()


def test_idle_gaps_are_charged_to_the_innermost_megatron_function():
    """Step window [0, 200]: GPU busy [10, 50], [150, 170], [180, 190]. Gaps of >= 50 us:
    [50, 150] (100 us, inside log() inside train()) and [0, 10] / [170, 180] / [190, 200] are
    shorter. A non-megatron function does not count."""
    trace = load_script("scripts/lib/gpu_trace.py")
    data = _trace()
    data["traceEvents"] += [
        {"ph": "X", "name": "megatron/training.py(1): train", "ts": 0, "dur": 200, "cat": "python_function"},
        {"ph": "X", "name": "megatron/training.py(9): log", "ts": 40, "dur": 30, "cat": "python_function"},
        {"ph": "X", "name": "torch/x.py(3): item", "ts": 45, "dur": 10, "cat": "python_function"},
    ]  # fmt: skip
    idle = trace.idle_by_host_function(data)
    assert idle["idle_us_per_step"] == 50 and idle["gaps_per_step"] == 0.5
    assert idle["by_function"] == [{"name": "megatron/training.py(9): log", "us_per_step": 50}]
    small = trace.idle_by_host_function(data, min_gap_us=10)
    assert small["idle_us_per_step"] == (10 + 100 + 10 + 10) / 2
    assert small["by_function"][0]["name"] == "megatron/training.py(9): log"
    assert {r["name"] for r in small["by_function"]} == {
        "megatron/training.py(9): log", "megatron/training.py(1): train"
    }  # fmt: skip


def test_idle_gaps_without_stacks_are_charged_to_host_ops():
    """A trace without Python stacks: the [50, 150] gap goes to the innermost op, annotation or
    CUDA runtime call at its start (the graph launch inside the optimizer annotation); the step
    annotations themselves never count, other categories neither."""
    trace = load_script("scripts/lib/gpu_trace.py")
    data = _trace()
    data["traceEvents"] += [
        {"ph": "X", "name": "optimizer", "ts": 40, "dur": 100, "cat": "user_annotation"},
        {"ph": "X", "name": "cudaGraphLaunch", "ts": 48, "dur": 20, "cat": "cuda_runtime"},
        {"ph": "X", "name": "megatron/x.py(1): f", "ts": 49, "dur": 2, "cat": "python_function"},
    ]  # fmt: skip
    events = ("cpu_op", "user_annotation", "cuda_runtime")
    idle = trace.idle_by_host_function(data, prefix="", categories=events)
    assert idle["by_function"] == [{"name": "cudaGraphLaunch", "us_per_step": 50}]
    data["traceEvents"] = [e for e in data["traceEvents"] if e["name"] != "cudaGraphLaunch"]
    idle = trace.idle_by_host_function(data, prefix="", categories=events)
    assert idle["by_function"] == [{"name": "optimizer", "us_per_step": 50}]
    data["traceEvents"] = [e for e in data["traceEvents"] if e["name"] != "optimizer"]
    idle = trace.idle_by_host_function(data, prefix="", categories=events)
    assert idle["by_function"] == [{"name": "(none)", "us_per_step": 50}]


def _charge_gaps_by_scanning_every_event(trace, prefix, min_gap_us, categories):
    """The definition idle_by_host_function implements with one sweep: each gap of at least
    ``min_gap_us`` goes to the shortest event (then the smallest name) covering its start."""
    events = trace["traceEvents"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    start = min(e["ts"] for e in steps)
    end = max(e["ts"] + e["dur"] for e in steps)
    busy = sorted(
        (max(e["ts"], start), min(e["ts"] + e["dur"], end))
        for e in events
        if e["cat"] in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    gaps, cursor = [], start
    for lo, hi in busy:
        if hi > lo:
            if lo - cursor >= min_gap_us:
                gaps.append((cursor, lo - cursor))
            cursor = max(cursor, hi)
    if end - cursor >= min_gap_us:
        gaps.append((cursor, end - cursor))
    totals = {}
    for at, length in gaps:
        covering = [
            (e["dur"], e["name"])
            for e in events
            if e["cat"] in categories and prefix in e["name"]
            and not e["name"].startswith("ProfilerStep#") and e["ts"] <= at <= e["ts"] + e["dur"]
        ]  # fmt: skip
        name = min(covering)[1] if covering else "(none)"
        totals[name] = totals.get(name, 0.0) + length
    return totals


def test_idle_gaps_sweep_charges_like_scanning_every_event():
    """A random host-bound trace: three threads of nested host events (ties in length, events
    that end exactly at a gap, gaps before any event), GPU work with gaps of every size; the
    sweep charges each gap exactly as testing every event against it does."""
    import random

    trace = load_script("scripts/lib/gpu_trace.py")
    rng = random.Random(5)
    events = [
        {"ph": "X", "name": f"ProfilerStep#{i}", "ts": 1000 * i, "dur": 1000, "cat": "user_annotation"}
        for i in (1, 2, 3)
    ]  # fmt: skip

    def nest(lo, hi, depth, thread):
        t = lo
        while depth and t < hi:
            length = rng.choice([5, 10, 10, 40, 120, 300])
            stop = min(t + length, hi)
            events.append({"ph": "X", "name": f"t{thread}/op{rng.randrange(12)}", "ts": t,
                           "dur": stop - t, "cat": rng.choice(["cpu_op", "cuda_runtime"])})  # fmt: skip
            nest(t, stop, depth - 1, thread)
            t = stop + rng.choice([0, 0, 3, 25])

    for thread in range(3):
        nest(rng.randrange(0, 200), 4100, 3, thread)
    t = 1000.0
    while t < 4000:
        length = rng.choice([2, 8, 30])
        events.append({"ph": "X", "name": "k", "ts": t, "dur": length, "cat": rng.choice(["kernel", "gpu_memcpy"])})
        t += length + rng.choice([0, 1, 19, 20, 21, 60, 150])
    data = {"traceEvents": events}
    for prefix, min_gap in (("", 20.0), ("op1", 20.0), ("", 1.0)):
        categories = ("cpu_op", "cuda_runtime")
        idle = trace.idle_by_host_function(data, prefix=prefix, min_gap_us=min_gap, categories=categories)
        want = _charge_gaps_by_scanning_every_event(data, prefix, min_gap, categories)
        assert len(want) >= 3, want  # the gaps fall under several events
        assert {r["name"]: r["us_per_step"] for r in idle["by_function"]} == {
            name: t / 3 for name, t in want.items()
        }


def test_long_kernels_are_grouped_by_name_and_grid_per_step():
    """Two steps: 'div' over the logits grid runs 300 us once a step; 'div' on another grid and
    the 20-30 us kernels of _trace() fall under min_us; a kernel outside the steps is ignored."""
    trace = load_script("scripts/lib/gpu_trace.py")
    data = _trace()
    data["traceEvents"] += [
        {"ph": "X", "name": "div", "ts": 5, "dur": 300, "cat": "kernel", "args": {"grid": [9, 1, 1]}},
        {"ph": "X", "name": "div", "ts": 105, "dur": 300, "cat": "kernel", "args": {"grid": [9, 1, 1]}},
        {"ph": "X", "name": "div", "ts": 60, "dur": 90, "cat": "kernel", "args": {"grid": [2, 1, 1]}},
        {"ph": "X", "name": "div", "ts": 500, "dur": 900, "cat": "kernel", "args": {"grid": [9, 1, 1]}},
    ]  # fmt: skip
    rows = trace.long_kernel_launches(data, min_us=100)
    assert rows == [
        {"name": "div", "grid": "[9, 1, 1]", "mean_us": 300, "us_per_step": 300, "calls_per_step": 1}
    ]
    names = {(r["name"], r["grid"]) for r in trace.long_kernel_launches(data, min_us=20)}
    assert names == {("div", "[9, 1, 1]"), ("div", "[2, 1, 1]"), ("_chunk_scan_fwd_kernel", "None"), ("gemm", "None")}


def test_trace_scripts_write_reports_tied_to_the_benchmark_run(tmp_path):
    """scripts/trace_idle.py and scripts/trace_kernels.py: a report with this analysis's
    provenance, the trace and the benchmark run it came from, and the analysis itself."""
    trace_file, source = tmp_path / "t.json", tmp_path / "bench.json"
    data = _trace()
    data["traceEvents"].append(
        {"ph": "X", "name": "div", "ts": 5, "dur": 300, "cat": "kernel", "args": {"grid": [9, 1, 1]}}
    )
    trace_file.write_text(json.dumps(data))
    source.write_text(json.dumps({"commit": "abc", "dirty": False, "device": "H200", "other": 1}))
    for script, key in (("scripts/trace_idle.py", "by_function"), ("scripts/trace_kernels.py", "kernels")):
        out = tmp_path / f"{key}.json"
        assert load_script(script).main([str(trace_file), "--source", str(source), "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["trace_source"] == {"file": str(source), "commit": "abc", "dirty": False, "device": "H200"}
        assert report["trace"] == str(trace_file) and "commit" in report and key in report
    assert report["kernels"][0]["name"] == "div" and report["kernels"][0]["us_per_step"] == 150


def test_no_te_systems_are_refused_where_te_imports():
    """A 'no TE' system run where TE imports would time TE's fused RoPE under the no-TE label
    (it happened on a warm H200): refused; TE systems are refused without TE; others run."""
    bench = _bench()
    assert bench.te_refusal("ours_local_graph_bf_triton", True) == bench.TE_PRESENT
    assert bench.te_refusal("ours_local_graph_bf_triton", False) is None
    assert bench.te_refusal("ours_te_graph_opt_bf_tadam_norerun_tce", False) == bench.TE_MISSING
    assert bench.te_refusal("ours_te_graph_opt_bf_tadam_norerun_tce", True) is None
    assert bench.te_refusal("ours_local", True) is None
    # every no-TE system is one that does not need TE
    assert all(not bench.OURS[name][1] for name in bench.WITHOUT_TE)
