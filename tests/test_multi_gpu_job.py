"""The multi-GPU job's plan and arithmetic, on CPU (scripts/gpu/multi_gpu.sh, multi_gpu.py).

``--dry-run`` prints every launch without a GPU: for NUM_GPUS 2, 4 and 8 every planned run fits
the GPU count (larger layouts are listed as skipped, none dropped), every parity layout of
tests/falcon_h1/test_tp_training.py is planned at its world size on CUDA / NCCL, and NVLink
multicast is off in the children's environment. A NUM_GPUS outside 1/2/4/8 is refused with a
message naming it. The scaling efficiency and MFU arithmetic is checked on fabricated step times.

tests/falcon_h1/test_tp_training.py is read in a child interpreter (:func:`_tp_training_cases`),
never imported into this pytest process: see there why.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, megatron_path, use

SCRIPT = ROOT / "scripts" / "gpu" / "multi_gpu.sh"
LINE = re.compile(r"^(RUN|SKIP) (\w+)/(\S+) nproc=(\d+): (.*)$")


def _driver():
    use("scripts")
    return importlib.import_module("gpu.multi_gpu")


def _env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MEGATRON=str(megatron_path()))
    # python3 in the script is this interpreter (the GPU machine's is its own).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    return env


def _dry_run(num_gpus: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), num_gpus, str(out), "--dry-run", *extra],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip


@functools.cache
def _tp_training_cases() -> dict:
    """``CASES`` of tests/falcon_h1/test_tp_training.py, imported in a fresh interpreter the way
    multi_gpu.py imports it (tests/ first on sys.path).

    Not imported here: pytest registers that file as ``tests.falcon_h1.test_tp_training``, so an
    import as ``falcon_h1.test_tp_training`` executes it a second time, and its ``from conftest
    import megatron_path`` then takes whichever conftest.py comes first on sys.path. When pytest
    collects all of tests/ (``make test``, CI) that is tests/tooling/conftest.py, which puts its
    own folder first on sys.path and has no ``megatron_path``: ImportError."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from project_paths import use; "
        "use('tests'); from falcon_h1 import test_tp_training as t; print(json.dumps(t.CASES))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "scripts" / "lib")],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.megatron
@pytest.mark.parametrize("num_gpus", [2, 4, 8])
def test_dry_run_plans_fit_the_gpus(num_gpus, tmp_path):
    out = tmp_path / "out"
    proc = _dry_run(str(num_gpus), out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not out.exists(), "a dry run writes nothing"
    assert "NCCL_NVLS_ENABLE=0" in proc.stdout and "NVSHMEM_DISABLE_NVLS=1" in proc.stdout
    entries = [LINE.match(line).groups() for line in proc.stdout.splitlines() if LINE.match(line)]
    planned: dict[tuple, tuple] = {}
    for kind, step, name, nproc, rest in entries:
        assert (step, name) not in planned, f"{step}/{name} planned twice"
        planned[(step, name)] = (kind, int(nproc), rest)
        if kind == "SKIP":
            assert int(nproc) > num_gpus, (name, nproc)
            continue
        assert int(nproc) <= num_gpus, (name, nproc)
        if int(nproc) == 0:  # checkpoint conversion, on CPU
            continue
        argv = shlex.split(rest, comments=True)
        assert argv[argv.index("--nproc-per-node") + 1] == nproc, rest
        assert "gloo" not in argv and "cpu" not in argv, rest
        if step != "scaling":  # scaling uses bench_falcon_h1.py's flags (CUDA by default)
            assert argv[argv.index("--device") + 1] == "cuda", rest
            assert argv[argv.index("--distributed-backend") + 1] == "nccl", rest
    steps = {step for step, _ in planned}
    assert steps == {"parity", "functional", "scaling"}, steps

    parity = {name: v for (step, name), v in planned.items() if step == "parity"}
    layouts = dict(_tp_training_cases(), bitnet_tp2=(None, None, 2), bitnet_tp4=(None, None, 4),
                   tp8=(None, None, 8))  # fmt: skip
    for name, case in layouts.items():
        assert name in parity, f"layout {name} not planned"
        kind, nproc, rest = parity[name]
        assert nproc == case[2], (name, nproc)
        assert kind == ("RUN" if case[2] <= num_gpus else "SKIP"), (name, kind)
        if kind == "RUN":
            for flag in case[3] if case[0] else ["--tensor-model-parallel-size"]:
                assert flag in shlex.split(rest), (name, flag)
    # Every run layout has its one-GPU reference and its checkpoint conversion planned.
    assert any(n.startswith("ref") and v[1] == 1 for n, v in parity.items())
    assert ("convert_g1_wide" in parity) == (num_gpus >= 8)
    scaling = [n for (step, n), v in planned.items() if step == "scaling" and v[0] == "RUN"]
    counts = sorted({int(n.rsplit("/x", 1)[1]) for n in scaling})
    assert counts == [g for g in (1, 2, 4, 8) if g <= num_gpus], scaling
    assert f"0.5b_s2048_b4/ours_bitnet/x{num_gpus}" in scaling, scaling


@pytest.mark.parametrize("bad", ["3", "0", "16", "two", "-2"])
def test_bad_num_gpus_is_refused(bad, tmp_path):
    proc = _dry_run(bad, tmp_path / "out")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"NUM_GPUS must be 1, 2, 4 or 8 (got '{bad}')" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_missing_arguments_print_the_usage():
    proc = subprocess.run(["bash", str(SCRIPT), "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash scripts/gpu/multi_gpu.sh NUM_GPUS OUT_DIR" in (
        proc.stderr
    ), proc.stderr


def test_driver_refuses_bad_num_gpus(tmp_path):
    with pytest.raises(SystemExit, match="NUM_GPUS .*must be one of 1, 2, 4, 8, got 3"):
        _driver().parse_args(["--num-gpus", "3", "--out-dir", str(tmp_path)])


def test_scaling_efficiency_arithmetic():
    d = _driver()
    # Tokens/s of the job: 2048 x 4 tokens per GPU per step, 8 GPUs, 100 ms per step.
    assert d.tokens_per_s(2048, 4, 8, 100.0) == 2048 * 4 * 8 * 10.0
    assert d.scaling_efficiency({1: 1000.0, 2: 950.0, 8: 910.0}) == {1: 1.0, 2: 0.95, 8: 0.91}
    assert d.scaling_efficiency({2: 950.0}) == {}, "no one-GPU baseline: no efficiency"
    assert d.mfu(1000.0, 3e9, 750.0) == 1000.0 * 3e9 / 750e12

    # Through the report: a step of 100 ms on one GPU and 125 ms on 8 GPUs (one micro-batch per
    # GPU each) is 80% data-parallel efficiency at 8 GPUs.
    def run(system: str, gpus: int, step_ms: float) -> dict:
        tok_s = d.tokens_per_s(2048, 4, gpus, step_ms)
        return {
            "step": "scaling", "ok": True, "case": "c", "system": system, "gpus": gpus,
            "tok_s": tok_s, "tok_s_per_gpu": tok_s / gpus, "mfu": d.mfu(tok_s / gpus, 1e9, 800),
        }  # fmt: skip

    runs = [run("ours_te", 1, 100.0), run("ours_te", 8, 125.0), run("ours_local", 8, 200.0),
            run("ours_bitnet", 8, 180.0)]  # fmt: skip
    report = {"num_gpus": 8, "runs": {f"r{i}": r for i, r in enumerate(runs)}}
    d.summarise_scaling(report, ("ours_local", "ours_bitnet"))
    # Float round-off of tokens/s (divisions by step times) only: relative 1e-12.
    eff = report["scaling_efficiency"]["c/ours_te"]
    assert eff["1"] == 1.0 and eff["8"] == pytest.approx(0.8, rel=1e-12), eff
    assert report["mfu"]["c/ours_te"]["8"] == pytest.approx(
        2048 * 4 / 0.125 * 1e9 / 800e12, rel=1e-12
    )
    assert report["bitnet_vs_bf16"]["c"]["bitnet_over_bf16_tok_s"] == pytest.approx(
        200.0 / 180.0, rel=1e-12
    )


def test_parity_tolerance():
    d = _driver()
    reference = {1: 4.0, 2: 3.0}
    assert d.parity_problems(reference, {1: 4.0 * (1 + 2**-9), 2: 3.0 * (1 + 0.019)}) == []
    step1 = d.parity_problems(reference, {1: 4.0 * (1 + 2**-7), 2: 3.0})
    assert len(step1) == 1 and step1[0].startswith("step 1:"), step1
    later = d.parity_problems(reference, {1: 4.0, 2: 3.0 * 1.03})
    assert len(later) == 1 and later[0].startswith("step 2:"), later
    assert d.parity_problems(reference, {1: 4.0}) != [], "a missing step fails"


@pytest.mark.megatron
def test_unknown_parity_case_and_golden_bundle_are_refused(tmp_path):
    proc = _dry_run("8", tmp_path / "out", "--steps", "parity", "--parity-cases", "tp2,tp3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--parity-cases: unknown 'tp3'; choose from tp2, tp4" in proc.stderr, proc.stderr
    assert "RUN " not in proc.stdout and not (tmp_path / "out").exists(), proc.stdout
    d = _driver()
    bundle = tmp_path / "functional_goldens_h200_x2.json"
    bundle.write_text('{"platform": "h200_x2", "goldens": {"gpt/no_such_case": {}}}')
    with pytest.raises(SystemExit, match="no functional case 'gpt/no_such_case'"):
        d.install_goldens(bundle)
