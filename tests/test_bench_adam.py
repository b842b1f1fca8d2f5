"""scripts/gpu/bench_adam.py on CPU: the optimizers it times perform AdamW with Megatron's
hyper-parameters (checked against the update written out), and a missing one is recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import bench_adam  # noqa: E402


def _adamw(p, g, steps):
    lr, (b1, b2), eps, wd = (bench_adam.HPARAMS[k] for k in ("lr", "betas", "eps", "weight_decay"))
    p, m, v = p.double().clone(), torch.zeros_like(p.double()), torch.zeros_like(p.double())
    for t in range(1, steps + 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g.double()
        v = b2 * v + (1 - b2) * g.double() ** 2
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def test_torch_cases_are_adamw():
    shapes = [(6, 4), (5,)]
    for case in ("torch_fused", "torch_foreach"):
        params = bench_adam.make_params(shapes, "cpu")
        start = [(p.detach().clone(), p.grad.clone()) for p in params]
        opt = bench_adam.make_optimizer(case, params)
        for _ in range(3):
            opt.step()
        for p, (p0, g) in zip(params, start):
            assert torch.allclose(p.detach().double(), _adamw(p0, g, 3), rtol=1e-6, atol=1e-9)


def test_run_records_every_case_and_compares_with_the_reference():
    shapes = bench_adam.model_shapes(layers=2, scale=64)
    results = bench_adam.run("cpu", shapes, 0, 1)
    assert set(results["cases"]) == set(bench_adam.CASES)
    ran = [c for c, r in results["cases"].items() if "error" not in r]
    assert "torch_fused" in ran and "torch_foreach" in ran
    first = results["cases"][ran[0]]
    assert first.get("reference") is True
    assert results["cases"][ran[-1]]["rel_diff_vs_reference"] < 1e-6
