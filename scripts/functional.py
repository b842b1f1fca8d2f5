#!/usr/bin/env python3
"""Run an upstream-style functional test case and compare it with its golden values.

A case is a directory ``tests/functional_tests/test_cases/<model>/<case>/`` holding
``model_config.yaml`` (upstream's format: ``ENV_VARS``, ``MODEL_ARGS``, ``TEST_TYPE``, plus
falcon-mcore's optional ``SCRIPT`` and ``NUM_PROCESSES``) and golden values
``golden_values_<platform>.json`` in upstream's format::

    {"lm loss": {"start_step": 1, "end_step": 20, "step_interval": 1, "values": {"1": 10.9, ...}},
     "num-zeros": {...}}

The runner launches the case with torchrun from the patched tree (``build/Megatron-LM``),
extracts per-iteration metrics from the log, and compares them with the goldens: ``lm loss``
within a relative tolerance (upstream: exact, else 5 %), ``num-zeros`` within 20 %. With
``--record`` it writes the goldens instead.

TEST_TYPE:
  regular      one run of ``--train-iters`` iterations.
  ckpt-resume  the uninterrupted run, then a run that stops (and saves) at the middle iteration
               and a run that resumes from that checkpoint. The resumed run's losses must equal
               the uninterrupted run's bit for bit, and the uninterrupted run is checked against
               the goldens.

Usage: scripts/functional.py --case hybrid/hybrid_tiny_tp1 [--platform cpu] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "functional_tests" / "test_cases"
BUILD = ROOT / "build" / "Megatron-LM"
DEFAULT_SCRIPTS = {"gpt": "pretrain_gpt.py", "hybrid": "pretrain_hybrid.py"}
METRIC_PATTERNS = {
    "lm loss": re.compile(r"\blm loss: ([0-9.Ee+-]+)"),
    "num-zeros": re.compile(r"\bnum zeros: ([0-9.Ee+-]+)"),
}
ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|")
TOLERANCES = {"lm loss": 0.05, "num-zeros": 0.20}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_case(case: str) -> tuple[Path, dict]:
    case_dir = CASES / case
    config_path = case_dir / "model_config.yaml"
    if not config_path.is_file():
        known = sorted(
            p.parent.relative_to(CASES).as_posix() for p in CASES.rglob("model_config.yaml")
        )
        sys.exit(
            f"error: no case {case!r} ({config_path} missing). Known cases:\n  "
            + "\n  ".join(known)
        )
    config = yaml.safe_load(config_path.read_text())
    for key in ("MODEL_ARGS", "TEST_TYPE"):
        if key not in config:
            sys.exit(f"error: {config_path}: missing {key}")
    if config["TEST_TYPE"] not in ("regular", "ckpt-resume"):
        sys.exit(f"error: {config_path}: TEST_TYPE must be regular or ckpt-resume")
    return case_dir, config


def model_args(config: dict, substitutions: dict[str, str], overrides: dict) -> list[str]:
    """MODEL_ARGS as a command line; ``true`` = bare flag, ``false``/None = omitted."""
    merged = dict(config["MODEL_ARGS"])
    merged.update(overrides)
    argv: list[str] = []
    for flag, value in merged.items():
        if value is False or value is None:
            continue
        argv.append(flag)
        if value is True:
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            text = str(item)
            for name, sub in substitutions.items():
                text = text.replace("${" + name + "}", sub)
            argv.append(text)
    return argv


def run_training(
    case_dir: Path, config: dict, work: Path, tag: str, overrides: dict, env_extra: dict
) -> dict[str, dict[int, float]]:
    """Launch one training run; return {metric: {iteration: value}} parsed from its log."""
    script = config.get("SCRIPT") or DEFAULT_SCRIPTS.get(case_dir.parent.name)
    if script is None:
        sys.exit(f"error: {case_dir}: set SCRIPT (no default for model {case_dir.parent.name})")
    nproc = int(config.get("NUM_PROCESSES", 1))
    subs = {
        "CHECKPOINT_SAVE_PATH": str(work / "checkpoints"),
        "CHECKPOINT_LOAD_PATH": str(work / "checkpoints"),
        "TENSORBOARD_PATH": str(work / "tensorboard"),
        "DATA_CACHE_PATH": str(work / "data_cache"),
    }
    argv = model_args(config, subs, overrides)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (config.get("ENV_VARS") or {}).items()})
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(BUILD), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(BUILD / script),
        *argv,
    ]
    log_path = work / f"{tag}.log"
    print(
        f"[functional] {tag}: {' '.join(cmd[4:7])} ... ({len(argv)} args), log {log_path}",
        flush=True,
    )
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=BUILD, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise SystemExit(f"error: {tag} run failed (exit {proc.returncode}); log tail:\n{tail}")
    metrics = parse_metrics(text)
    print(
        f"[functional] {tag}: {len(metrics.get('lm loss', {}))} iterations in {time.time() - start:.0f} s"
    )
    return metrics


def parse_metrics(text: str) -> dict[str, dict[int, float]]:
    metrics: dict[str, dict[int, float]] = {name: {} for name in METRIC_PATTERNS}
    for line in text.splitlines():
        match = ITERATION.search(line)
        if not match:
            continue
        step = int(match.group(1))
        for name, pattern in METRIC_PATTERNS.items():
            value = pattern.search(line)
            if value:
                metrics[name][step] = float(value.group(1))
    return {k: v for k, v in metrics.items() if v}


def to_golden(metrics: dict[str, dict[int, float]]) -> dict:
    golden = {}
    for name, values in metrics.items():
        steps = sorted(values)
        golden[name] = {
            "start_step": steps[0],
            "end_step": steps[-1],
            "step_interval": 1,
            "values": {str(s): values[s] for s in steps},
        }
    return golden


def compare(golden: dict, metrics: dict[str, dict[int, float]]) -> list[str]:
    problems = []
    for name, spec in golden.items():
        if name not in TOLERANCES:
            continue
        got = metrics.get(name, {})
        rtol = TOLERANCES[name]
        exact = 0
        for step_text, expected in spec["values"].items():
            step = int(step_text)
            if step not in got:
                problems.append(f"{name}: step {step} missing from the run")
                continue
            value = got[step]
            if value == expected:
                exact += 1
            elif abs(value - expected) > rtol * max(abs(expected), 1e-12):
                problems.append(
                    f"{name}: step {step}: got {value!r}, golden {expected!r} (rtol {rtol})"
                )
        print(
            f"[functional] {name}: {exact}/{len(spec['values'])} steps bit-identical to the goldens"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, help="<model>/<case> under " + str(CASES))
    parser.add_argument("--platform", default="cpu", help="golden values suffix (cpu, h100)")
    parser.add_argument("--record", action="store_true", help="write the goldens")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--metrics-out", type=Path, help="also write the run's metrics (JSON)")
    args = parser.parse_args(argv)
    if not (BUILD / "megatron").is_dir():
        sys.exit(f"error: {BUILD} missing: run `make apply-patches` first")
    case_dir, config = load_case(args.case)
    golden_path = case_dir / f"golden_values_{args.platform}.json"
    env_extra = {}
    if args.platform == "cpu":
        env_extra["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(tempfile.mkdtemp(prefix="falcon-mcore-functional."))
    try:
        (work / "full").mkdir()
        metrics = run_training(case_dir, config, work / "full", "full", {}, env_extra)
        problems: list[str] = []
        if config["TEST_TYPE"] == "ckpt-resume":
            iters = int(config["MODEL_ARGS"]["--train-iters"])
            half = iters // 2
            (work / "resume").mkdir()
            run_training(
                case_dir,
                config,
                work / "resume",
                "first-half",
                {"--exit-interval": half},
                env_extra,
            )
            resumed = run_training(case_dir, config, work / "resume", "resumed", {}, env_extra)
            losses = resumed.get("lm loss", {})
            if sorted(losses) != list(range(half + 1, iters + 1)):
                problems.append(
                    f"resumed run logged iterations {sorted(losses)}, expected {half + 1}..{iters}"
                )
            full = metrics["lm loss"]
            for step, value in losses.items():
                expected = full.get(step)
                if step == half + 2 and expected is not None and half + 1 in full:
                    # Upstream logs a run's first iteration without resetting the loss
                    # accumulator, so the next line is the mean of both iterations.
                    expected = (full[half + 1] + full[half + 2]) / 2
                    if abs(value - expected) <= 1e-6 * abs(expected):
                        continue
                if value != expected:
                    problems.append(
                        f"resume: step {step}: resumed lm loss {value!r} != uninterrupted {expected!r}"
                    )
            if not problems:
                print(
                    f"[functional] resume: steps {half + 1}..{iters} equal the uninterrupted run "
                    f"(step {half + 2}: the two-iteration mean upstream logs after a restart)"
                )
        if args.metrics_out:
            args.metrics_out.write_text(json.dumps(to_golden(metrics), indent=2) + "\n")
        if args.record:
            golden_path.write_text(json.dumps(to_golden(metrics), indent=2) + "\n")
            print(f"[functional] recorded {golden_path.relative_to(ROOT)}")
        else:
            if not golden_path.is_file():
                sys.exit(f"error: {golden_path} missing; record it with --record")
            problems += compare(json.loads(golden_path.read_text()), metrics)
        if problems:
            print("[functional] FAILED:\n  " + "\n  ".join(problems))
            return 1
        print(f"[functional] {args.case} ({args.platform}) passed")
        return 0
    finally:
        if args.keep:
            print(f"[functional] work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
