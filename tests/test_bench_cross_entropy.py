"""scripts/gpu/bench_cross_entropy.py on CPU: its float64 reference is the cross entropy, the
unfused Megatron loss it times agrees with it, and a case that cannot run is recorded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from project_paths import load_script

bench = load_script("scripts/gpu/bench_cross_entropy.py")


def test_reference_is_the_cross_entropy_and_its_gradient():
    logits, target, grad_output = bench.make_inputs(5, 3, 40, "cpu")
    grad_output = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    loss, grad = bench.reference(logits, target, grad_output)
    x = logits.double().requires_grad_()
    expected = F.cross_entropy(x.view(-1, 40), target.view(-1), reduction="none").view(5, 3)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_output.double())
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert logits.dtype == torch.bfloat16 and grad_output.dtype == torch.float32


@pytest.mark.megatron
def test_run_measures_megatrons_loss_and_records_what_cannot_run(
    single_rank_model_parallel, monkeypatch
):
    import torch.distributed as dist

    monkeypatch.setitem(bench.SHAPES, "tiny", (6, 2, 50))
    results = bench.run(["tiny"], "cpu", dist.group.WORLD, 0, 1, cases=("unfused", "te", "nope"))
    cases = results["shapes"]["tiny"]["cases"]
    assert results["shapes"]["tiny"]["tokens"] == 12
    unfused = cases["unfused"]
    # float32 arithmetic on bf16 inputs against float64: float32 rounding of ~log(50) terms;
    # the gradient of bf16 logits is bf16 (autograd casts the fp32 one): half a bf16 ulp
    assert unfused["loss_max_abs_err"] < 1e-5
    assert unfused["grad_dtype"] == "bfloat16"
    assert 0 < unfused["grad_max_abs_err"] <= 2**-8 * unfused["grad_max_abs"]
    assert "graph_ms" not in unfused  # timings only on CUDA
    assert cases["nope"]["error"].startswith("ValueError: unknown case")
    assert "error" in cases["te"]  # no Transformer Engine here
    md = bench.markdown({"device": "cpu", "commit": "c0ffee", "dirty": False, "command": "x", **results})
    assert "| tiny | unfused | - | - | - | bfloat16 |" in md
    assert "| tiny | nope | ValueError: unknown case" in md
