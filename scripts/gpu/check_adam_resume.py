#!/usr/bin/env python3
"""Resume a Falcon-H1 run across Adam implementations: TE FusedAdam <-> PyTorch fused AdamW.

Why: the launcher now turns ``--use-torch-fused-adam`` on by default on GPUs, and the flag is
deliberately not restored from a checkpoint. A team that started a run with Transformer
Engine's FusedAdam (the launcher default before) resumes it with PyTorch's fused AdamW, or the
reverse. The two keep Adam's step count in different places (TE: per parameter group; PyTorch:
a per-parameter ``step`` tensor); a resume that lost the step count, or the moments, would keep
training without an error, only with wrong updates (bias correction restarted, or zero moments).

What runs: ``scripts/falcon_h1/train_falcon_h1.sh`` on one GPU with its defaults (TE spec,
whole-iteration CUDA graph, optimizer graph, distributed optimizer, bf16, torch_dist
checkpoints), a 4-layer model of the 0.5B preset's width, mock data, fixed seed, 6 iterations:

* ``te_full`` / ``torch_full``: 6 iterations with each optimizer, no checkpoint;
* ``te_save`` / ``torch_save``: the first 3, checkpoint at 3 (``--exit-interval 3``, so the
  learning-rate schedule is that of the 6-iteration run);
* ``te_to_te`` / ``torch_to_torch``: load that checkpoint, iterations 4-6 with the same one;
* ``te_to_torch`` / ``torch_to_te``: the same with the other one;
* ``te_to_torch_no_optim``: ``te_to_torch`` with ``--no-load-optim`` (moments, step count and
  learning-rate scheduler state not loaded).

A phase's runs share the GPU (the second phase starts when the checkpoints exist).

Upstream's log of a run's second iteration is the mean of its first two: the first iteration is
logged without resetting the loss accumulator (``should_reset = not is_first_iteration`` in
``training_log``), so with ``--log-interval 1`` the next line averages both. For a resumed run
that is iteration 5 (on the H200, 2026-12-04, every resumed run logged 3e-3 off the
uninterrupted runs there, eager or graphed, and exactly the mean of their iterations 4 and 5).
``unaverage`` undoes it (``2 x logged - first``) on every run before the checks.
Three more runs are reported only (``diagnostics``, each against ``te_full``): ``te_full_eager``
(no CUDA graphs), ``te_to_te_eager`` (a resume without graphs) and
``te_to_te_no_optimizer_graph`` (the whole-iteration graph, an eager optimizer step).

Checks, on the ``lm loss`` the runs log for iterations 4-6:

* the save runs logged iterations 1-3 and the resumed runs 4-6 (a resume that found no
  checkpoint would start at 1 and match the full runs);
* ``control_noise``: per iteration, the relative loss difference of ``te_full`` and
  ``torch_full``; the two implementations round differently (params agreed to 2.6e-7 after 4
  steps in results/h200/falcon_h1/bench_adam.json) and the difference grows with the
  iterations, so it is the tolerance's reason: tol_i = max(4 x control_noise_i, 5e-6) (5e-6: five
  units of the 7 printed digits; two runs of one configuration differed by one unit, the GPU
  kernels are not bitwise deterministic; an un-averaged loss carries up to twice the printing's
  rounding, 1e-6);
* ``te_full`` and ``torch_full`` agree: control_noise_i <= 1e-4 at every iteration. Rounding
  differences stayed below 1e-5 before the optimizer graph's capture; PyTorch's AdamW under the
  graph with a float learning rate (frozen at the capture step) put 5.4e-4 at iteration 6;
* every resumed run but ``te_to_torch_no_optim`` is within tol_i of the uninterrupted run of the
  Adam that wrote its checkpoint (``te_full`` / ``torch_full``) at every iteration (iteration 4's
  loss, from the loaded parameters, too);
* ``te_to_torch`` is within tol_i of ``te_to_te``, and ``torch_to_te`` of ``torch_to_torch``
  (the same checkpoint and resume, only the Adam differs);
* ``te_to_torch_no_optim`` differs from ``te_to_te`` by more than 10 x tol_i at some iteration:
  the comparison can tell a resume that lost the optimizer state from a correct one. If it
  cannot, the check fails as inconclusive.

    python3 scripts/gpu/check_adam_resume.py --megatron build/Megatron-LM --out OUT/adam_resume.json
    python3 scripts/gpu/check_adam_resume.py --from-report EARLIER.json --out RECHECKED.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from provenance import provenance  # noqa: E402

ITERS = 6
SAVE_AT = 3
# A 4-layer model of the 0.5B preset's width (the extra flags win over the preset's).
MODEL = ["--num-layers", "4", "--hybrid-layer-pattern", "PPPP"]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|")
FLOOR = 5e-6
# Largest te_full vs torch_full difference (relative) accepted: see the module docstring.
MAX_CONTROL_NOISE = 1e-4
RESUMED = ("te_to_te", "torch_to_torch", "te_to_torch", "torch_to_te", "te_to_torch_no_optim")
SENSITIVITY = 10.0
# Information-only runs (see the module docstring), each compared with te_full.
DIAGNOSTIC = ("te_full_eager", "te_to_te_eager", "te_to_te_no_optimizer_graph")


def parse_losses(log: str) -> dict[int, float]:
    """``{iteration: lm loss}`` from a Megatron training log."""
    return {int(it): float(loss) for it, loss in LOSS.findall(log)}


def unaverage(curve: dict[int, float]) -> dict[int, float]:
    """Each iteration's own loss from a logged curve: upstream logs a run's second iteration as
    the mean of its first two (see the module docstring)."""
    if len(curve) < 2:
        return dict(curve)
    first, second = sorted(curve)[:2]
    return {**curve, second: 2 * curve[second] - curve[first]}


def rel_diffs(a: dict[int, float], b: dict[int, float], iters: list[int]) -> dict[int, float]:
    """Relative difference of two loss curves per iteration of ``iters`` (inf where missing)."""
    return {i: abs(a[i] - b[i]) / abs(b[i]) if i in a and i in b else float("inf") for i in iters}


def verdict(losses: dict[str, dict[int, float]]) -> dict:
    """The checks of the module docstring on the runs' logged loss curves."""
    losses = {run: unaverage(curve) for run, curve in losses.items()}
    after = list(range(SAVE_AT + 1, ITERS + 1))
    noise = rel_diffs(losses["te_full"], losses["torch_full"], after)
    tol = {i: max(4 * noise[i], FLOOR) for i in after}
    checks = [
        {"name": "te_full and torch_full agree", "rel_diff": noise, "max": MAX_CONTROL_NOISE,
         "passed": all(noise[i] <= MAX_CONTROL_NOISE for i in after)}
    ]  # fmt: skip
    # A resume that found no checkpoint would train from scratch and match the full runs.
    for run, expected in (
        ("te_save", range(1, SAVE_AT + 1)),
        ("torch_save", range(1, SAVE_AT + 1)),
        *((run, after) for run in RESUMED),
    ):
        logged = sorted(losses[run])
        checks.append(
            {"name": f"{run} logged iterations {list(expected)}", "logged": logged,
             "passed": logged == list(expected)}
        )  # fmt: skip
    # Each resume against the uninterrupted run of the Adam that wrote its checkpoint; each cross
    # resume also against the resume of the same checkpoint with the same Adam.
    for run, ref in (
        *((run, f"{run.split('_to_')[0]}_full") for run in RESUMED[:4]),
        ("te_to_torch", "te_to_te"),
        ("torch_to_te", "torch_to_torch"),
    ):
        diff = rel_diffs(losses[run], losses[ref], after)
        checks.append(
            {"name": f"{run} vs {ref}", "rel_diff": diff, "tol": tol,
             "passed": all(diff[i] <= tol[i] for i in after)}
        )  # fmt: skip
    lost = rel_diffs(losses["te_to_torch_no_optim"], losses["te_to_te"], after)
    ratio = max(lost[i] / tol[i] for i in after)
    checks.append(
        {
            "name": "te_to_torch_no_optim differs from te_to_te (the check can fail)",
            "rel_diff": lost,
            "max_diff_over_tol": ratio,
            "needs_more_than": SENSITIVITY,
            "passed": ratio != float("inf") and ratio > SENSITIVITY,
        }
    )
    failed = sum(not c["passed"] for c in checks)
    return {
        "control_noise": noise,
        "tol": tol,
        "checks": checks,
        "diagnostics": {
            run: rel_diffs(losses[run], losses["te_full"], sorted(losses[run]))
            for run in DIAGNOSTIC
            if run in losses
        },
        "summary": {"n_checks": len(checks), "n_passed": len(checks) - failed, "n_failed": failed},
    }


def launch(megatron: Path, name: str, work: Path, port: int, env_vars: dict, extra: list[str]):
    """Start one launcher run (its output to ``work/<name>.log``); the process."""
    env = dict(os.environ)
    env.update(
        PRESET="0.5b", NPROC="1", SEQ_LEN="1024", MBS="2", GBS="2", TRAIN_ITERS=str(ITERS),
        LR="1e-3", MIN_LR="1e-4", WARMUP="1", PYTHON=sys.executable, MEGATRON=str(megatron),
        MASTER_PORT=str(port),
    )  # fmt: skip
    env.update(env_vars)
    cmd = [
        "bash",
        str(REPO / "scripts" / "falcon_h1" / "train_falcon_h1.sh"),
        *MODEL,
        "--eval-iters", "0", "--log-interval", "1", "--seed", "1234",
        *extra,
    ]  # fmt: skip
    log = open(work / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def run_all(megatron: Path, work: Path, timeout: float) -> dict:
    """The runs of the module docstring, on one GPU, each phase's runs at the same time (tiny
    models: the first phase mostly compiles kernels, the second mostly starts up)."""
    te, torch_adam = {"TORCH_FUSED_ADAM": "0"}, {"TORCH_FUSED_ADAM": "1"}
    te_ckpt, torch_ckpt = work / "ckpt_te", work / "ckpt_torch"
    save = ["--exit-interval", str(SAVE_AT)]
    phases = [
        [
            ("te_full", te, []),
            ("torch_full", torch_adam, []),
            ("te_save", {**te, "SAVE": str(te_ckpt), "SAVE_INTERVAL": str(SAVE_AT)}, save),
            ("torch_save", {**torch_adam, "SAVE": str(torch_ckpt), "SAVE_INTERVAL": str(SAVE_AT)}, save),
            ("te_full_eager", {**te, "CUDA_GRAPHS": "none"}, []),
        ],
        [
            ("te_to_te", {**te, "LOAD": str(te_ckpt)}, []),
            ("torch_to_torch", {**torch_adam, "LOAD": str(torch_ckpt)}, []),
            ("te_to_torch", {**torch_adam, "LOAD": str(te_ckpt)}, []),
            ("torch_to_te", {**te, "LOAD": str(torch_ckpt)}, []),
            ("te_to_torch_no_optim", {**torch_adam, "LOAD": str(te_ckpt)}, ["--no-load-optim"]),
            ("te_to_te_eager", {**te, "LOAD": str(te_ckpt), "CUDA_GRAPHS": "none"}, []),
            ("te_to_te_no_optimizer_graph", {**te, "LOAD": str(te_ckpt), "OPTIMIZER_GRAPH": "0"}, []),
        ],
    ]  # fmt: skip
    runs = {}
    for phase in phases:
        procs = {
            name: (launch(megatron, name, work, 29631 + i, env_vars, extra), env_vars, extra)
            for i, (name, env_vars, extra) in enumerate(phase)
        }
        for name, (proc, env_vars, extra) in procs.items():
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = "timeout"
            log = (work / f"{name}.log").read_text()
            runs[name] = {
                "returncode": returncode,
                "losses": parse_losses(log),
                "env": env_vars,
                "extra": extra,
                "tail": log[-2000:] if returncode != 0 else "",
            }
            print(f"{name}: rc {returncode}, losses {runs[name]['losses']}", flush=True)
    return runs


def write_report(report: dict, out: Path) -> int:
    """Write ``report`` to ``out``; the exit status: 0 when every check passed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    summary = report["summary"]
    print(f"{summary['n_passed']}/{summary['n_checks']} checks passed; report {out}")
    return 0 if summary["n_failed"] == 0 else 1


def recheck(source: Path, out: Path) -> int:
    """The checks of this version on the runs of an earlier report (its provenance kept)."""
    earlier = json.loads(source.read_text())
    losses = {
        name: {int(i): loss for i, loss in run["losses"].items()}
        for name, run in earlier["runs"].items()
    }
    report = {
        **provenance(sys.argv),
        "rechecked_report": str(source),
        "runs_provenance": {k: earlier[k] for k in ("commit", "dirty", "device") if k in earlier},
        **verdict(losses),
    }
    return write_report(report, out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron", type=Path, help="the patched Megatron-LM tree (for runs)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--work", type=Path, help="logs and checkpoints (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per phase's run")
    parser.add_argument(
        "--from-report",
        type=Path,
        help="no runs: apply the checks to the logged losses of this earlier report's runs",
    )
    args = parser.parse_args(argv)
    if args.from_report:
        return recheck(args.from_report, args.out)
    if args.megatron is None:
        parser.error("--megatron is needed to run (or pass --from-report)")
    work = args.work or Path(tempfile.mkdtemp(prefix="adam-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = run_all(args.megatron.resolve(), work, args.timeout)
    report = {**provenance(sys.argv), "iters": ITERS, "save_at": SAVE_AT, "model_flags": MODEL}
    crashed = [name for name, run in runs.items() if run["returncode"] != 0]
    if crashed:
        report["summary"] = {"n_checks": len(runs), "n_passed": 0, "n_failed": len(crashed)}
        report["error"] = f"runs failed: {', '.join(crashed)}"
    else:
        report.update(verdict({name: run["losses"] for name, run in runs.items()}))
    report["runs"] = runs
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
