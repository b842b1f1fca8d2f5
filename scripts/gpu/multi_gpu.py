#!/usr/bin/env python3
"""Multi-GPU job (issue 15): NCCL parity, functional goldens and data-parallel scaling.

Run through ``scripts/gpu/multi_gpu.sh NUM_GPUS OUT_DIR [--dry-run]`` (it sources
``scripts/gpu/setup_env.sh --te`` and keeps NVLink multicast off). Three steps, each choosable
with ``--steps``; every run whose world size exceeds NUM_GPUS is listed as skipped, never
squeezed onto fewer GPUs:

``parity``
    The fine-tuning layouts of ``tests/falcon_h1/test_tp_training.py`` (its checkpoint
    converter, its ``CASES`` with their flags, its one-rank references) on CUDA / NCCL instead of
    CPU / gloo: TP=2/4, SP, TP2 x PP2, TP2 x DP2 with the distributed optimizer, CP2, TP2 x CP2 x
    SP, 2 Mamba groups at TP=4; added here: BitNet at TP=2/4 and TP=8 (on a second converted
    checkpoint with 8 attention heads: the test's tiny shape has 4). Every run is bf16 mixed
    precision (what users run). Each layout's 6 losses are compared with its one-GPU run step
    by step within :data:`PARITY_RTOL_STEP1` / :data:`PARITY_RTOL` (why: see there).
``functional``
    The functional cases (``scripts/functional.py``) on CUDA / NCCL: compared with
    ``golden_values_h200_x{N}.json``, or with ``--record`` written there (next to the CPU
    goldens; also bundled into OUT_DIR, the only place a device call returns files from).
``scaling``
    Falcon-H1-0.5B training step tokens/s per GPU at 1, 2, 4, 8 GPUs (<= NUM_GPUS), data
    parallel, one micro-batch per GPU per step (weak scaling), with the flags of
    ``scripts/gpu/bench_falcon_h1.py`` (``megatron_flags``, ``OURS``); scaling efficiency =
    tokens/s per GPU at N / at 1 GPU; MFU against the bf16 matmul rate measured in the job;
    BitNet vs bf16 (same spec) at NUM_GPUS.

Writes ``OUT_DIR/multi_gpu_x{N}.json`` (provenance, ``num_gpus``, ``scaling_efficiency``,
``mfu``, per-run details; rewritten after every run) and ``.md``, the run logs as
``OUT_DIR/logs_x{N}.tar.gz`` and, with ``--record``, ``functional_goldens_<platform>.json``
(``--install-goldens FILE`` copies such a bundle next to the CPU goldens of this checkout).
Exit status 0 only when every run that was started passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402

ALLOWED_GPUS = (1, 2, 4, 8)
STEPS = ("parity", "functional", "scaling")
# NVLink multicast stays off (device KINDS.md: a program using it can put a shared host's GPUs
# out of service). Every child process gets these, whatever its caller's environment.
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Upstream's setting for tensor / sequence parallelism on GPUs (the TP communication is issued
# in order with the compute that needs it).
CHILD_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", **NO_MULTICAST}

# --- parity tolerance ------------------------------------------------------------------------
# bf16 keeps 8 significand bits: one unit in the last place is 2**-8 = 0.39% relative. Between a
# TP=N and a one-GPU run the weights at step 1 are identical, but every row-parallel GEMM sums
# its K dimension in N partial products reduced by NCCL (bf16, in another order than one
# GPU's GEMM), SP / CP move the norm and attention reductions, and the kernels differ with the
# local shapes: logits differ by a few bf16 units, and their fp32 loss (a mean over the tokens)
# by at most about one unit: PARITY_RTOL_STEP1. SGD at lr 1.0 (the harness's choice, so that a
# wrong gradient on one rank shows) feeds those differences into the weights, and each later
# step adds its own: PARITY_RTOL for every step, 5 units. Neither is a measurement yet: the
# report records each case's largest relative difference; tighten these once the first runs
# show the spread (on CPU the same layouts agree in every printed digit, in fp32).
PARITY_RTOL_STEP1 = 2.0**-8
PARITY_RTOL = 5 * 2.0**-8
PARITY_ITERS = 6

# --- scaling ---------------------------------------------------------------------------------
SCALING_GPUS = (1, 2, 4, 8)
# Gradient all-reduce overlapped with the backward pass, at every GPU count (also at 1, so the
# steps compared differ only in the number of ranks).
DP_FLAGS = ["--overlap-grad-reduce"]


@dataclass
class Run:
    """One launch: ``argv`` on ``nproc`` GPUs (0: no GPU, e.g. a checkpoint conversion)."""

    step: str
    name: str
    nproc: int
    argv: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        note = f"  # {self.info['note']}" if self.info.get("note") else ""
        return f"RUN {self.step}/{self.name} nproc={self.nproc}: {shlex.join(self.argv)}{note}"


@dataclass
class Skip:
    """A run of the job that does not fit NUM_GPUS (listed in the report, not run)."""

    step: str
    name: str
    nproc: int
    reason: str

    def line(self) -> str:
        return f"SKIP {self.step}/{self.name} nproc={self.nproc}: {self.reason}"


Plan = list[Run | Skip]


def check_num_gpus(num_gpus: int) -> int:
    """``num_gpus`` if it is one of :data:`ALLOWED_GPUS`, else a clear error."""
    if num_gpus not in ALLOWED_GPUS:
        raise SystemExit(
            f"error: NUM_GPUS (--num-gpus) must be one of {', '.join(map(str, ALLOWED_GPUS))}, "
            f"got {num_gpus}"
        )
    return num_gpus


def fits(nproc: int, num_gpus: int) -> bool:
    return nproc <= num_gpus


def torchrun(nproc: int, script: Path) -> list[str]:
    """``torchrun --standalone`` (a free rendezvous port) with ``nproc`` ranks, one per GPU."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), str(script),
    ]  # fmt: skip


def relative_differences(reference: dict[int, float], losses: dict[int, float]) -> dict[int, float]:
    """``{step: |loss - reference| / |reference|}`` over the reference's steps."""
    return {s: abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference if s in losses}


def parity_problems(reference: dict[int, float], losses: dict[int, float]) -> list[str]:
    """Step-by-step comparison with the one-GPU run (see :data:`PARITY_RTOL`)."""
    problems = []
    if sorted(losses) != sorted(reference):
        problems.append(f"logged steps {sorted(losses)}, the one-GPU run {sorted(reference)}")
    for step, rel in relative_differences(reference, losses).items():
        limit = PARITY_RTOL_STEP1 if step == min(reference) else PARITY_RTOL
        if not rel <= limit:
            problems.append(
                f"step {step}: lm loss {losses[step]!r} vs one GPU {reference[step]!r} "
                f"(relative {rel:.2e} > {limit:.2e})"
            )
    return problems


def tokens_per_s(seq: int, micro_batch: int, gpus: int, step_ms: float) -> float:
    """Tokens per second of the whole job: one micro-batch per GPU per step."""
    return seq * micro_batch * gpus / (step_ms / 1e3)


def scaling_efficiency(tok_s_per_gpu: dict[int, float]) -> dict[int, float]:
    """``{gpus: tokens/s per GPU at gpus / tokens/s per GPU at 1 GPU}`` (weak scaling: 1.0 is
    perfect); empty without a one-GPU measurement."""
    base = tok_s_per_gpu.get(1)
    if not base:
        return {}
    return {gpus: value / base for gpus, value in sorted(tok_s_per_gpu.items())}


def mfu(tok_s_per_gpu: float, flops_per_token: float, matmul_tflops: float) -> float:
    """Model FLOPs utilisation of one GPU against the measured bf16 matmul rate."""
    return tok_s_per_gpu * flops_per_token / (matmul_tflops * 1e12)


def median_step_ms(text: str, first: int, last: int) -> float:
    """Median ``elapsed time per iteration (ms)`` of iterations ``first..last`` of a log."""
    import re

    pattern = re.compile(
        r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)"
    )
    times = [float(m.group(2)) for m in pattern.finditer(text) if first <= int(m.group(1)) <= last]
    if not times:
        raise ValueError(f"no iteration times for steps {first}..{last} in the log")
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# the project's modules this job reuses


def load_modules(megatron: Path) -> dict[str, ModuleType]:
    """The CPU-rank fine-tuning test, the functional runner and the Falcon-H1 benchmark."""
    # tests/conftest.py resolves the patched tree from this variable (project_paths).
    os.environ["FALCON_MCORE_BUILD"] = str(megatron)
    use("tests", "scripts", "scripts_lib")
    use("megatron", megatron=megatron)
    modules = {
        "tp_training": importlib.import_module("falcon_h1.test_tp_training"),
        "functional": importlib.import_module("functional"),
        "bench": importlib.import_module("gpu.bench_falcon_h1"),
        "oracle": importlib.import_module("falcon_h1.oracle"),
        "flops": importlib.import_module("flops"),
    }
    # scripts/functional.py launches from its BUILD constant (build/Megatron-LM of the
    # checkout); on the GPU machine the patched tree is the one setup_env.sh unpacked.
    modules["functional"].BUILD = megatron
    return modules


# --------------------------------------------------------------------------------------------
# parity


def parity_cases(tp: ModuleType) -> dict[str, tuple[str, list[str], int, list[str]]]:
    """``{name: (checkpoint, one-GPU args, ranks, args)}``: the CPU test's layouts, BitNet at
    TP=2/4 and TP=8 on the wide checkpoint."""
    cases = dict(tp.CASES)
    bitnet = tp._SGD + ["--use-bitnet"]
    cases["bitnet_tp2"] = ("g1", bitnet, 2, bitnet + tp._TP2)
    cases["bitnet_tp4"] = ("g1", bitnet, 4, bitnet + tp._TP4)
    cases["tp8"] = ("g1_wide", tp._SGD, 8, tp._SGD + ["--tensor-model-parallel-size", "8"])
    return cases


def finetune_argv(tp: ModuleType, megatron: Path, ckpt: Path, nproc: int, args: list) -> list[str]:
    """test_tp_training's fine-tune (its settings: 6 steps, sequence 32, micro-batch 2, seed
    1234, no dropout) on CUDA / NCCL in bf16, local spec with the GPU flags of the benchmark."""
    bench_local = ["--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm"]
    return torchrun(nproc, megatron / "pretrain_mamba.py") + [
        "--load", str(ckpt), "--use-checkpoint-args", "--no-load-optim", "--no-load-rng",
        "--finetune", "--device", "cuda", "--distributed-backend", "nccl", *bench_local,
        "--bf16", "--no-gradient-accumulation-fusion",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(tp.VOCAB),
        "--ckpt-format", "torch_dist", "--seq-length", "32", "--max-position-embeddings", "256",
        "--micro-batch-size", "2", "--train-iters", str(PARITY_ITERS), "--seed", "1234",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", *args,
    ]  # fmt: skip


def convert_wide_argv(megatron: Path, hf_dir: Path, ckpt: Path) -> list[str]:
    """The project's converter (as test_tp_training's ``_convert`` calls it) for the 8-head
    checkpoint."""
    return [
        sys.executable, str(megatron / "tools/checkpoint/falcon_h1_conversion.py"),
        "hf-to-megatron", "--hf-dir", str(hf_dir), "--save-dir", str(ckpt),
        "--target-tp", "1", "--target-pp", "1", "--ckpt-format", "torch_dist",
    ]  # fmt: skip


def plan_parity(
    mods: dict, megatron: Path, work: Path, num_gpus: int, only: Optional[list[str]] = None
) -> Plan:
    """Conversions, one-GPU references and layouts (``only``: these layouts)."""
    tp = mods["tp_training"]
    plan: Plan = []
    references: dict[tuple, str] = {}
    cases = parity_cases(tp)
    for name in only or []:
        if name not in cases:
            raise SystemExit(
                f"error: --parity-cases: unknown {name!r}; choose from {', '.join(cases)}"
            )
    for name, (ckpt, ref_args, ranks, args) in cases.items():
        if only and name not in only:
            continue
        if not fits(ranks, num_gpus):
            plan.append(Skip("parity", name, ranks, f"needs {ranks} GPUs > NUM_GPUS {num_gpus}"))
            continue
        key = (ckpt, tuple(ref_args))
        if key not in references:
            ref_name = f"ref{len(references)}_{ckpt}"
            references[key] = ref_name
            argv = finetune_argv(tp, megatron, work / f"ckpt_{ckpt}", 1, ref_args)
            plan.append(Run("parity", ref_name, 1, argv, {"ckpt": ckpt}))
        argv = finetune_argv(tp, megatron, work / f"ckpt_{ckpt}", ranks, args)
        plan.append(Run("parity", name, ranks, argv, {"ckpt": ckpt, "ref": references[key]}))
    needed = {r.info["ckpt"] for r in plan if isinstance(r, Run)}
    converts = []
    for ckpt in sorted(needed):
        target = work / f"ckpt_{ckpt}"
        if ckpt == "g1_wide":
            argv = convert_wide_argv(megatron, work / "hf_g1_wide", target)
        else:
            groups = int(ckpt[1:])
            argv = ["tests/falcon_h1/test_tp_training.py:_convert", f"groups={groups}", str(target)]
        converts.append(Run("parity", f"convert_{ckpt}", 0, argv, {"ckpt": ckpt}))
    return converts + plan


def convert(mods: dict, run: Run, work: Path) -> None:
    """Make the checkpoint ``run`` names (on CPU, like the CPU test)."""
    tp, oracle = mods["tp_training"], mods["oracle"]
    ckpt = run.info["ckpt"]
    if ckpt == "g1_wide":
        shape = oracle.TinyShape(layers=2, heads=8, mamba_groups=1, rms_norm=True, vocab=tp.VOCAB)
        oracle.build_hf_model(shape, oracle.MULTIPLIERS, seed=3).save_pretrained(
            work / "hf_g1_wide"
        )
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(run.argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
        return
    tmp = work / f"convert_{ckpt}"
    tmp.mkdir(parents=True, exist_ok=True)
    made = tp._convert(mods["tp_training"].megatron_path(), tmp, groups=int(ckpt[1:]))
    (work / f"ckpt_{ckpt}").symlink_to(made, target_is_directory=True)


# --------------------------------------------------------------------------------------------
# functional cases


def gpu_overrides() -> dict[str, Any]:
    """MODEL_ARGS changes that move a CPU functional case to CUDA / NCCL (the GPU flags of the
    local spec that bench_falcon_h1.py uses; the model is unchanged)."""
    return {
        "--device": "cuda",
        "--distributed-backend": "nccl",
        "--no-gradient-accumulation-fusion": True,
        "--no-rope-fusion": True,
        "--no-persist-layer-norm": True,
    }


def ordered_cases(functional: ModuleType, cases: list[str]) -> list[str]:
    """``cases`` with every MUST_DIFFER_FROM partner first (its goldens are read)."""
    done: list[str] = []

    def visit(case: str, seen: tuple) -> None:
        if case in done or case in seen:
            return
        _, config = functional.load_case(case)
        for entry in config.get("MUST_DIFFER_FROM") or []:
            if entry["case"] in cases:
                visit(entry["case"], seen + (case,))
        done.append(case)

    for case in cases:
        visit(case, ())
    return done


def plan_functional(mods: dict, megatron: Path, work: Path, num_gpus: int, cases: list) -> Plan:
    functional = mods["functional"]
    plan: Plan = []
    for case in ordered_cases(functional, cases):
        case_dir, config = functional.load_case(case)
        nproc = int(config.get("NUM_PROCESSES", 1))
        if not fits(nproc, num_gpus):
            reason = f"needs {nproc} GPUs > NUM_GPUS {num_gpus}"
            plan.append(Skip("functional", case, nproc, reason))
            continue
        run_dir = work / case.replace("/", "__")
        subs = {  # as scripts/functional.py's run_training substitutes them
            "CHECKPOINT_SAVE_PATH": str(run_dir / "checkpoints"),
            "CHECKPOINT_LOAD_PATH": str(run_dir / "checkpoints"),
            "TENSORBOARD_PATH": str(run_dir / "tensorboard"),
            "DATA_CACHE_PATH": str(run_dir / "data_cache"),
        }
        args = functional.model_args(config, subs, gpu_overrides())
        script = config.get("SCRIPT") or functional.DEFAULT_SCRIPTS[case_dir.parent.name]
        argv = torchrun(nproc, megatron / script) + args
        info = {}
        if config["TEST_TYPE"] == "ckpt-resume":
            half = int(config["MODEL_ARGS"]["--train-iters"]) // 2
            info["note"] = f"then the same with --exit-interval {half}, then resumed"
        plan.append(Run("functional", case, nproc, argv, info))
    return plan


def run_functional(functional: ModuleType, case: str, platform: str, record: bool, work: Path):
    """scripts/functional.py's checks of one case, run with :func:`gpu_overrides`: loss drop,
    must-differ, resume; then the goldens are recorded or compared. ``(problems, golden)``."""
    case_dir, config = functional.load_case(case)
    golden_path = case_dir / f"golden_values_{platform}.json"
    if not record and not golden_path.is_file():
        return [f"{golden_path.relative_to(ROOT)} missing: record it with --record"], None
    work.mkdir(parents=True, exist_ok=True)
    (work / "full").mkdir(exist_ok=True)
    over = gpu_overrides()
    metrics = functional.run_training(case_dir, config, work / "full", "full", over, {})
    losses = metrics.get("lm loss", {})
    problems = functional.check_loss_drop(config, losses)
    problems += functional.check_must_differ(case, config, losses, platform)
    if config["TEST_TYPE"] == "ckpt-resume":
        half = int(config["MODEL_ARGS"]["--train-iters"]) // 2
        (work / "resume").mkdir(exist_ok=True)
        first = dict(over, **{"--exit-interval": half})
        functional.run_training(case_dir, config, work / "resume", "first-half", first, {})
        resumed = functional.run_training(case_dir, config, work / "resume", "resumed", over, {})
        problems += functional.check_resume(config, losses, resumed.get("lm loss", {}))
    golden = functional.to_golden(metrics)
    if record:
        if not problems:
            golden_path.write_text(json.dumps(golden, indent=2) + "\n")
        return problems, golden
    problems += functional.compare(json.loads(golden_path.read_text()), metrics, platform)
    return problems, golden


def install_goldens(bundle: Path) -> list[Path]:
    """Write a ``functional_goldens_<platform>.json`` bundle's goldens next to the CPU ones."""
    data = json.loads(bundle.read_text())
    cases_dir = ROOT / "tests" / "functional_tests" / "test_cases"
    written = []
    for case, golden in data["goldens"].items():
        case_dir = cases_dir / case
        if not (case_dir / "model_config.yaml").is_file():
            raise SystemExit(f"error: {bundle}: no functional case {case!r} in this checkout")
        path = case_dir / f"golden_values_{data['platform']}.json"
        path.write_text(json.dumps(golden, indent=2) + "\n")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# scaling


def scaling_argv(
    bench: ModuleType, megatron: Path, case: str, system: str, gpus: int, iters: int
) -> list[str]:
    """bench_falcon_h1.py's training step of ``case`` / ``system`` (its model flags, optimizer
    and settings) with ``gpus`` data-parallel ranks, one micro-batch each."""
    extra, _ = bench.OURS[system]
    _, _, mbs = bench.CASES[case]
    beta1, beta2 = bench.BETAS
    return torchrun(gpus, megatron / "pretrain_mamba.py") + [
        *bench.megatron_flags(case),
        "--global-batch-size", str(mbs * gpus),  # after megatron_flags' one-GPU value: wins
        "--bf16", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--train-iters", str(iters), "--lr", str(bench.LR), "--lr-decay-style", "constant",
        "--optimizer", "adam", "--adam-beta1", str(beta1), "--adam-beta2", str(beta2),
        "--weight-decay", str(bench.WEIGHT_DECAY), "--clip-grad", str(bench.CLIP),
        "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", "100000", "--no-gradient-accumulation-fusion", *DP_FLAGS, *extra,
    ]  # fmt: skip


def plan_scaling(
    mods: dict,
    megatron: Path,
    num_gpus: int,
    cases: list,
    systems: list,
    bitnet_pair: tuple[str, str],
    iters: int,
) -> Plan:
    bench = mods["bench"]
    plan: Plan = []
    for case in cases:
        for system in systems:
            for gpus in SCALING_GPUS:
                name = f"{case}/{system}/x{gpus}"
                info = {"case": case, "system": system, "gpus": gpus}
                if not fits(gpus, num_gpus):
                    reason = f"needs {gpus} GPUs > NUM_GPUS {num_gpus}"
                    plan.append(Skip("scaling", name, gpus, reason))
                    continue
                argv = scaling_argv(bench, megatron, case, system, gpus, iters)
                plan.append(Run("scaling", name, gpus, argv, info))
        for system in bitnet_pair:
            if system in systems:
                continue  # already measured at NUM_GPUS above
            name = f"{case}/{system}/x{num_gpus}"
            info = {"case": case, "system": system, "gpus": num_gpus}
            argv = scaling_argv(bench, megatron, case, system, num_gpus, iters)
            plan.append(Run("scaling", name, num_gpus, argv, info))
    return plan


def summarise_scaling(report: dict, bitnet_pair: tuple[str, str]) -> None:
    """Per case and system: tokens/s per GPU by GPU count, efficiency, MFU; BitNet / bf16."""
    runs = [r for r in report["runs"].values() if r["step"] == "scaling" and r.get("ok")]
    by_key: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_key.setdefault(f"{r['case']}/{r['system']}", {})[r["gpus"]] = r
    report["scaling_efficiency"], report["mfu"], report["tok_s_per_gpu"] = {}, {}, {}
    for key, per in sorted(by_key.items()):
        per_gpu = {g: per[g]["tok_s_per_gpu"] for g in sorted(per)}
        report["tok_s_per_gpu"][key] = {str(g): v for g, v in per_gpu.items()}
        report["scaling_efficiency"][key] = {
            str(g): v for g, v in scaling_efficiency(per_gpu).items()
        }
        report["mfu"][key] = {str(g): per[g]["mfu"] for g in sorted(per)}
    bf16, bitnet = bitnet_pair
    ratios = {}
    for case in {r["case"] for r in runs}:
        a = by_key.get(f"{case}/{bf16}", {}).get(report["num_gpus"])
        b = by_key.get(f"{case}/{bitnet}", {}).get(report["num_gpus"])
        if a and b:
            ratios[case] = {"bf16": bf16, "bitnet": bitnet, "gpus": report["num_gpus"],
                            "bitnet_over_bf16_tok_s": b["tok_s"] / a["tok_s"]}  # fmt: skip
    report["bitnet_vs_bf16"] = ratios


# --------------------------------------------------------------------------------------------
# the job


def child_env(megatron: Path) -> dict[str, str]:
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(megatron), env.get("PYTHONPATH")] if p)
    return env


def launch(run: Run, megatron: Path, log: Path, timeout: int) -> tuple[int, str]:
    with open(log, "w") as fh:
        fh.write(shlex.join(run.argv) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(
                run.argv, cwd=megatron, env=child_env(megatron), stdout=fh,
                stderr=subprocess.STDOUT, timeout=timeout,
            )  # fmt: skip
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -9
    return code, log.read_text(errors="replace")


def tail_error(text: str) -> str:
    lines = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return " | ".join(lines[-3:])[-1500:] or "\n".join(text.splitlines()[-5:])


def markdown(report: dict) -> str:
    lines = [
        f"# Multi-GPU job on {report['num_gpus']} GPU(s)",
        "",
        f"- device: {report.get('device')}; date (UTC): {report.get('date_utc')}; commit "
        f"{report.get('commit')}{' (dirty tree)' if report.get('dirty') else ''}",
        f"- versions: {json.dumps(report.get('versions'))}",
        f"- command: `{report.get('command')}`",
        f"- parity tolerance (bf16): step 1 relative {PARITY_RTOL_STEP1:.2e}, every step "
        f"{PARITY_RTOL:.2e} (scripts/gpu/multi_gpu.py says why)",
        "",
        "| run | GPUs | result | detail |",
        "|---|---:|---|---|",
    ]
    for name, r in report["runs"].items():
        if r.get("skipped"):
            result, detail = "skipped", r["skipped"]
        elif r.get("ok"):
            result = "passed"
            detail = ""
            if "max_rel_diff" in r:
                detail = f"max relative loss difference {r['max_rel_diff']:.2e}"
            if "tok_s_per_gpu" in r:
                detail = (f"{r['median_ms']:.1f} ms/step, {r['tok_s_per_gpu']:.0f} tokens/s/GPU,"
                          f" MFU {r['mfu']:.1%}")  # fmt: skip
        else:
            result, detail = "FAILED", "; ".join(r.get("problems", []))[:300]
        lines.append(f"| {name} | {r.get('nproc', '')} | {result} | {detail} |")
    if report.get("scaling_efficiency"):
        lines += ["", "## Data-parallel scaling (tokens/s per GPU vs 1 GPU)", "",
                  "| case/system | GPUs: efficiency (MFU) |", "|---|---|"]  # fmt: skip
        for key, eff in report["scaling_efficiency"].items():
            cells = ", ".join(f"{g}: {e:.1%} ({report['mfu'][key][g]:.1%})" for g, e in eff.items())
            lines.append(f"| {key} | {cells} |")
    for case, r in report.get("bitnet_vs_bf16", {}).items():
        lines.append(f"\nBitNet / bf16 tokens/s, {case}, {r['gpus']} GPUs: "
                     f"{r['bitnet_over_bf16_tok_s']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


class Job:
    """Executes a plan, writing the report after every run."""

    def __init__(self, args: argparse.Namespace, mods: dict, work: Path):
        self.args, self.mods, self.work = args, mods, work
        self.out = args.out_dir
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stem = f"multi_gpu_x{args.num_gpus}"
        from provenance import provenance

        self.report: dict = provenance([sys.executable, *sys.argv])
        self.report.update(
            num_gpus=args.num_gpus,
            steps=args.steps,
            runs={},
            parity_rtol_step1=PARITY_RTOL_STEP1,
            parity_rtol=PARITY_RTOL,
        )
        self.losses: dict[str, dict[int, float]] = {}
        self.goldens: dict[str, dict] = {}
        self.started = time.time()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.report, indent=1) + "\n")
        (self.out / f"{self.stem}.md").write_text(markdown(self.report))
        if self.goldens:
            bundle = {"platform": self.args.platform, "goldens": self.goldens}
            path = self.out / f"functional_goldens_{self.args.platform}.json"
            path.write_text(json.dumps(bundle, indent=1) + "\n")
        with tarfile.open(self.out / f"logs_x{self.args.num_gpus}.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def record(self, item, result: dict) -> None:
        result.update(step=item.step, nproc=item.nproc)
        self.report["runs"][f"{item.step}/{item.name}"] = result
        print(f"[multi_gpu] {item.step}/{item.name}: " + json.dumps(
            {k: v for k, v in result.items() if k not in ("losses",)}), flush=True)  # fmt: skip
        self.save()

    def execute(self, item) -> None:
        if isinstance(item, Skip):
            self.record(item, {"skipped": item.reason})
            return
        if self.args.deadline_s and time.time() - self.started > self.args.deadline_s:
            self.record(item, {"skipped": "not run: --deadline-s reached"})
            return
        handler: Callable = getattr(self, f"_{item.step}")
        t0 = time.time()
        try:
            result = handler(item)
        except (Exception, SystemExit) as err:  # a failed run is recorded; the job goes on
            result = {"ok": False, "problems": [f"{type(err).__name__}: {err}"[-2000:]]}
        result["wall_s"] = round(time.time() - t0, 1)
        self.record(item, result)

    def _parity(self, run: Run) -> dict:
        if run.nproc == 0:
            convert(self.mods, run, self.work)
            return {"ok": True}
        code, text = launch(run, self.args.megatron, self.logs / f"parity_{run.name}.log", 900)
        if code != 0:
            return {"ok": False, "problems": [f"exit {code}: {tail_error(text)}"]}
        losses = self.mods["functional"].parse_metrics(text).get("lm loss", {})
        self.losses[run.name] = losses
        result: dict = {"ok": True, "losses": {str(s): v for s, v in losses.items()}}
        if "ref" not in run.info:
            if sorted(losses) != list(range(1, PARITY_ITERS + 1)):
                return {"ok": False, "problems": [f"logged steps {sorted(losses)}"], **result}
            return result
        reference = self.losses.get(run.info["ref"])
        if reference is None:
            return {"ok": False, "problems": [f"one-GPU run {run.info['ref']} failed"]}
        problems = parity_problems(reference, losses)
        rel = relative_differences(reference, losses)
        result.update(ok=not problems, problems=problems, reference=run.info["ref"],
                      max_rel_diff=max(rel.values()) if rel else math.nan)  # fmt: skip
        return result

    def _functional(self, run: Run) -> dict:
        problems, golden = run_functional(
            self.mods["functional"], run.name, self.args.platform, self.args.record,
            self.work / "functional" / run.name.replace("/", "__"),
        )  # fmt: skip
        if self.args.record and golden is not None and not problems:
            self.goldens[run.name] = golden
        return {"ok": not problems, "problems": problems, "recorded": self.args.record}

    def _scaling(self, run: Run) -> dict:
        bench = self.mods["bench"]
        case, system, gpus = run.info["case"], run.info["system"], run.info["gpus"]
        if bench.OURS[system][1] and not self.have_te:
            return {"skipped": "Transformer Engine not importable here", **run.info}
        log = self.logs / f"scaling_{run.name.replace('/', '_')}.log"
        code, text = launch(run, self.args.megatron, log, 900)
        if code != 0:
            return {"ok": False, "problems": [f"exit {code}: {tail_error(text)}"], **run.info}
        shape, seq, mbs = bench.CASES[case]
        first, last, _ = bench.timing_plan(self.args.iters)
        step_ms = median_step_ms(text, first, last)
        tok_s = tokens_per_s(seq, mbs, gpus, step_ms)
        dims = self.mods["flops"].FalconH1Dims.from_hf_config(bench.SHAPES[shape])
        flops = self.mods["flops"].training_flops_per_token(dims, seq)["total"]
        losses = self.mods["functional"].parse_metrics(text).get("lm loss", {})
        return {
            "ok": True, **run.info, "median_ms": step_ms, "timed_steps": [first, last],
            "tok_s": tok_s, "tok_s_per_gpu": tok_s / gpus, "flops_per_token": flops,
            "mfu": mfu(tok_s / gpus, flops, self.report["matmul_tflops"]),
            "losses": {str(s): v for s, v in losses.items()},
        }  # fmt: skip

    def run(self, plan: list) -> int:
        bench = self.mods["bench"]
        if any(isinstance(i, Run) and i.step == "scaling" for i in plan):
            import torch

            self.report["matmul_tflops"] = bench.matmul_tflops()  # GPU 0, before the runs
            torch.cuda.empty_cache()
            self.have_te = bench.te_available()
        for item in plan:
            self.execute(item)
        if "scaling" in self.args.steps:
            summarise_scaling(self.report, tuple(self.args.bitnet_pair.split(",")))
        started = [r for r in self.report["runs"].values() if not r.get("skipped")]
        failed = [n for n, r in self.report["runs"].items() if not r.get("skipped")
                  and not r.get("ok")]  # fmt: skip
        self.report["summary"] = {
            "n_checks": len(started), "n_passed": len(started) - len(failed),
            "n_failed": len(failed), "n_skipped": len(self.report["runs"]) - len(started),
            "failed": failed,
        }  # fmt: skip
        self.save()
        print(markdown(self.report))
        return 1 if failed else 0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-gpus", type=int, help="NUM_GPUS: 1, 2, 4 or 8")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--megatron", type=Path, default=ROOT / "build" / "Megatron-LM")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated: " + ", ".join(STEPS)
    )
    parser.add_argument("--record", action="store_true", help="functional: write the goldens")
    parser.add_argument("--platform", help="functional goldens suffix (default h200_x{N})")
    parser.add_argument(
        "--parity-cases", default="", help="parity layouts (default: all; a call lasts 10 min)"
    )
    parser.add_argument("--cases", default="", help="functional cases (default: all)")
    parser.add_argument(
        "--scaling-cases", default="0.5b_s2048_b4", help="bench_falcon_h1.py cases to scale"
    )
    parser.add_argument(
        "--scaling-systems",
        default="ours_te",
        help="bench_falcon_h1.py systems measured at 1, 2, 4, 8 GPUs",
    )
    parser.add_argument(
        "--bitnet-pair",
        default="ours_local,ours_bitnet",
        help="bf16,BitNet systems (same spec) compared at NUM_GPUS",
    )
    parser.add_argument("--iters", type=int, default=16, help="scaling: steps per run")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="start no run after this many seconds (0: no limit)",
    )
    parser.add_argument("--work-dir", type=Path, help="checkpoints and logs (default: a temp dir)")
    parser.add_argument(
        "--install-goldens",
        type=Path,
        help="write a functional_goldens_*.json bundle's goldens into this checkout",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.install_goldens:
        return args
    if args.num_gpus is None or args.out_dir is None:
        parser.error("--num-gpus and --out-dir are required")
    check_num_gpus(args.num_gpus)
    args.steps = [s for s in args.steps.split(",") if s]
    for step in args.steps:
        if step not in STEPS:
            parser.error(f"--steps: unknown {step!r}; choose from {', '.join(STEPS)}")
    if len(args.bitnet_pair.split(",")) != 2:
        parser.error(
            "--bitnet-pair: two systems, bf16 first then BitNet (e.g. ours_local,ours_bitnet)"
        )
    args.platform = args.platform or f"h200_x{args.num_gpus}"
    args.megatron = args.megatron.resolve()
    return args


def make_plan(args: argparse.Namespace, mods: dict, work: Path) -> Plan:
    plan: Plan = []
    if "parity" in args.steps:
        only = [c for c in args.parity_cases.split(",") if c]
        plan += plan_parity(mods, args.megatron, work, args.num_gpus, only)
    if "functional" in args.steps:
        functional = mods["functional"]
        cases = [c for c in args.cases.split(",") if c] or functional.known_cases()
        for case in cases:
            functional.load_case(case)  # an unknown case stops here, naming the known ones
        plan += plan_functional(mods, args.megatron, work / "functional", args.num_gpus, cases)
    if "scaling" in args.steps:
        bench = mods["bench"]
        bench.timing_plan(args.iters)
        cases = [c for c in args.scaling_cases.split(",") if c]
        systems = [s for s in args.scaling_systems.split(",") if s]
        for c in cases:
            if c not in bench.CASES:
                raise SystemExit(f"error: --scaling-cases: unknown {c!r}; choose from "
                                 f"{', '.join(bench.CASES)}")  # fmt: skip
        for s in systems + args.bitnet_pair.split(","):
            if s not in bench.OURS:
                raise SystemExit(f"error: --scaling-systems/--bitnet-pair: unknown {s!r}; "
                                 f"choose from {', '.join(bench.OURS)}")  # fmt: skip
        pair = tuple(args.bitnet_pair.split(","))
        plan += plan_scaling(mods, args.megatron, args.num_gpus, cases, systems, pair, args.iters)
    return plan


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.install_goldens:
        for path in install_goldens(args.install_goldens):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    if not (args.megatron / "megatron" / "core").is_dir():
        raise SystemExit(f"error: --megatron {args.megatron} is not a patched Megatron tree")
    mods = load_modules(args.megatron)
    if args.dry_run:
        work = Path("WORK")
        print(f"# multi_gpu dry run: NUM_GPUS={args.num_gpus}, steps {','.join(args.steps)}")
        print("# child environment: " + " ".join(f"{k}={v}" for k, v in CHILD_ENV.items()))
        for item in make_plan(args, mods, work):
            print(item.line())
        return 0
    for key, value in NO_MULTICAST.items():
        if os.environ.get(key) != value:
            raise SystemExit(f"error: {key} must be {value} (NVLink multicast off; "
                             "scripts/gpu/multi_gpu.sh exports it)")  # fmt: skip
    # Every child inherits these (scripts/functional.py starts its runs from os.environ).
    os.environ.update(CHILD_ENV)
    import torch

    have = torch.cuda.device_count()
    if have < args.num_gpus:
        raise SystemExit(f"error: NUM_GPUS {args.num_gpus} but this machine has {have} GPU(s)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="multi_gpu."))
    work.mkdir(parents=True, exist_ok=True)
    job = Job(args, mods, work.resolve())
    return job.run(make_plan(args, mods, work.resolve()))


if __name__ == "__main__":
    sys.exit(main())
