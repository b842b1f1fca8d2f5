"""Every CPU functional case (tests/functional_tests/test_cases/*/*) against its CPU goldens.

Each case trains a tiny model through the real entry point (pretrain_gpt.py,
pretrain_hybrid.py or pretrain_mamba.py) with torchrun on CPU; scripts/functional.py compares
the logged lm loss / num-zeros with golden_values_cpu.json (and, for ckpt-resume cases, the
resumed run with the uninterrupted one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "functional_tests" / "test_cases"
CPU_CASES = sorted(
    p.parent.relative_to(CASES).as_posix() for p in CASES.glob("*/*/golden_values_cpu.json")
)

pytestmark = pytest.mark.megatron


def test_cases_exist():
    assert len(CPU_CASES) >= 6, CPU_CASES


@pytest.mark.parametrize("case", CPU_CASES)
def test_functional_case_cpu(case, megatron_tree):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "functional.py"), "--case", case, "--platform", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "passed" in output
