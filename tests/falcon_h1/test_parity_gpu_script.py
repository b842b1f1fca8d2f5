"""scripts/gpu/check_falcon_h1_hf_parity.py on CPU (--cpu-smoke) and the strict weight loading it
shares with the CPU parity test (oracle.load_hf_weights)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from falcon_h1.oracle import (
    MULTIPLIERS,
    TinyShape,
    build_hf_model,
    build_megatron_model,
    load_hf_weights,
    megatron_config,
)

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu" / "check_falcon_h1_hf_parity.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("parity_script_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_multipliers_are_14_distinct_and_not_1():
    numbers = [v for v in MULTIPLIERS.values() for v in (v if isinstance(v, list) else [v])]
    assert len(numbers) == 14 and len(set(numbers)) == 14 and 1.0 not in numbers


def test_script_uses_the_oracle_multipliers_and_all_14_numbers():
    script = _script_module()
    assert len(script.MULTIPLIER_SCALARS) == 14
    for field, index in script.MULTIPLIER_SCALARS:
        changed = script.dropped(MULTIPLIERS, field, index)
        value = changed[field] if index is None else changed[field][index]
        original = MULTIPLIERS[field] if index is None else MULTIPLIERS[field][index]
        assert value == 1.0 and original != 1.0
    assert MULTIPLIERS["ssm_multipliers"][0] != 1.0  # dropped() returned a copy
    assert script.expected_kernels(True, False) == ["split"]
    assert script.expected_kernels(False, True) == ["chunk_scan", "conv1d", "rmsnorm"]


def test_kernel_calls_are_counted():
    """On CUDA the script requires the kernels it counts; the counters wrap the entry points."""
    import types

    script = _script_module()
    fake = types.SimpleNamespace(
        _kernel_split_scan=lambda x: x + 1,
        _kernel_chunk_scan=lambda x: x,
        _kernel_conv1d=None,  # causal_conv1d not installed
        _kernel_rmsnorm_fn=lambda x, z=None: x,
    )
    calls = script.count_kernel_calls(fake)
    assert fake._kernel_split_scan(1) == 2 and fake._kernel_split_scan(2) == 3
    fake._kernel_rmsnorm_fn(0, z=1)
    assert calls == {"split": 2, "chunk_scan": 0, "conv1d": 0, "rmsnorm": 1}
    assert fake._kernel_conv1d is None


def test_strict_loading_names_missing_and_unexpected_keys(single_rank_model_parallel):
    shape = TinyShape(layers=1)
    hf = build_hf_model(shape)
    mg = build_megatron_model(shape, megatron_config(shape))
    load_hf_weights(mg, hf.state_dict(), shape)  # complete: no error
    state = dict(hf.state_dict())
    del state["model.layers.0.mamba.dt_bias"]
    with pytest.raises(KeyError):  # the mapping itself needs every HF tensor
        load_hf_weights(mg, state, shape)
    smaller = TinyShape(layers=1, rms_norm=False)  # maps no Mamba norm weight
    with pytest.raises(ValueError, match=r"missing \['decoder.layers.0.self_attention.mamba.norm"):
        load_hf_weights(mg, build_hf_model(smaller).state_dict(), smaller)
    bigger = TinyShape(layers=2)
    with pytest.raises(ValueError, match=r"unexpected \['decoder.layers.1"):
        load_hf_weights(mg, build_hf_model(bigger).state_dict(), bigger)


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path):
    """Two of the 8 cases (one with the negative control) end to end on CPU."""
    out = tmp_path / "parity.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out),
         "--megatron", str(ROOT / "build" / "Megatron-LM"),
         "--cases", "g2_norm1_plain,g1_norm1_memeff"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pass"] and report["summary"]["n_failed"] == 0
    assert report["multipliers"] == MULTIPLIERS
    assert [c["case"] for c in report["cases"]] == ["g1_norm1_memeff", "g2_norm1_plain"]
    control = report["cases"][1]["negative_control_rel_to_scale"]
    assert len(control) == 14 and not report["cases"][1]["negative_control_too_weak"]
    assert len(report["commit"]) == 40 and isinstance(report["dirty"], bool)
