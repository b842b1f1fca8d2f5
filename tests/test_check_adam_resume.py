"""scripts/gpu/check_adam_resume.py's verdict on CPU, from synthetic Megatron logs: it passes
a correct resume and fails each way a resume can go wrong (its runs need a GPU and Transformer
Engine: results/h200/falcon_h1/adam_resume.json)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import check_adam_resume as car  # noqa: E402

LINE = (
    " [2026-12-04 12:46:43.199506] iteration {it:8d}/       6 | consumed samples:           40 |"
    " elapsed time per iteration (ms): 109.7 | learning rate: 1.000000E-04 | global batch size:"
    "     4 | lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 3.951 |"
)
FULL = {1: 10.41, 2: 10.30, 3: 10.12, 4: 9.871234, 5: 9.552345, 6: 9.213456}


def log(curve: dict[int, float]) -> str:
    return "\n".join(LINE.format(it=it, loss=loss) for it, loss in sorted(curve.items()))


def logged(curve: dict[int, float]) -> dict[int, float]:
    """What upstream prints for ``curve``: its second iteration as the mean of the first two."""
    first, second = sorted(curve)[:2]
    return {**curve, second: (curve[first] + curve[second]) / 2}


def good_runs() -> dict[str, dict[int, float]]:
    """The logs of a correct resume (as upstream prints them: see ``logged``)."""
    head = {i: FULL[i] for i in (1, 2, 3)}
    tail = {i: FULL[i] for i in (4, 5, 6)}
    torch_full = {i: v * (1 + 3e-7 * (i > 3)) for i, v in FULL.items()}
    runs = {
        "te_full": dict(FULL),
        "torch_full": torch_full,
        "te_save": dict(head),
        "torch_save": dict(head),
        "te_to_te": dict(tail),
        "torch_to_torch": {i: v * (1 + 1e-7) for i, v in tail.items()},
        "te_to_torch": {i: v * (1 - 2e-7) for i, v in tail.items()},
        "torch_to_te": dict(tail),
        "te_to_torch_no_optim": {i: v * (1 + 3e-3) for i, v in tail.items()},
    }
    return {run: logged(curve) for run, curve in runs.items()}


def test_parse_losses_reads_megatron_log_lines():
    assert car.parse_losses(log(FULL)) == {i: float(f"{v:.6E}") for i, v in FULL.items()}
    assert car.parse_losses("iteration 1/ 6 | no loss here |") == {}


def test_correct_resume_passes():
    result = car.verdict(good_runs())
    assert result["summary"]["n_failed"] == 0, result["checks"]
    assert result["tol"] == {4: car.FLOOR, 5: car.FLOOR, 6: car.FLOOR}  # 4 x 3e-7 < the floor


def test_lost_optimizer_state_fails():
    runs = good_runs()
    runs["te_to_torch"] = dict(runs["te_to_torch_no_optim"])
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == ["te_to_torch vs te_full", "te_to_torch vs te_to_te"]


def test_resume_that_started_from_scratch_fails():
    runs = good_runs()
    runs["torch_to_te"] = dict(runs["te_full"])  # no checkpoint found: iterations 1-6
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == ["torch_to_te logged iterations [4, 5, 6]"]


def test_insensitive_comparison_is_inconclusive():
    runs = good_runs()
    runs["te_to_torch_no_optim"] = {i: v * (1 + 4e-5) for i, v in runs["te_to_te"].items()}
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == ["te_to_torch_no_optim differs from te_to_te (the check can fail)"]


def test_noisy_implementations_widen_the_tolerance_where_they_differ():
    """Noise 1e-5 at iteration 6 only: a cross resume may differ by 3e-5 there, not at 5."""
    runs = good_runs()
    runs["torch_full"] = logged({i: v * (1 + 1e-5 * (i == 6)) for i, v in FULL.items()})
    runs["torch_to_te"] = logged({i: FULL[i] * (1 + 3e-5 * (i == 6)) for i in (4, 5, 6)})
    result = car.verdict(runs)
    assert abs(result["tol"][6] - 4e-5) < 1e-9 and result["tol"][5] == car.FLOOR
    assert result["summary"]["n_failed"] == 0, result["checks"]
    runs["torch_to_te"] = logged({i: FULL[i] * (1 + 3e-5 * (i >= 5)) for i in (4, 5, 6)})
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == ["torch_to_te vs torch_full", "torch_to_te vs torch_to_torch"]


def test_unaverage_inverts_upstreams_second_iteration_mean():
    assert car.unaverage(logged(FULL)) == {**FULL, 2: 2 * ((FULL[1] + FULL[2]) / 2) - FULL[1]}
    assert abs(car.unaverage(logged(FULL))[2] - FULL[2]) < 1e-12
    assert car.unaverage({4: 1.0}) == {4: 1.0}


def test_the_logged_mean_would_fail_without_unaverage(monkeypatch):
    """The H200 pattern: a resumed run's logged iteration 5 is the mean of 4 and 5."""
    runs = good_runs()
    assert abs(runs["te_to_te"][5] / FULL[5] - 1) > 1e-3
    monkeypatch.setattr(car, "unaverage", dict)
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert "te_to_te vs te_full" in failed


def test_an_offset_shared_by_every_resume_fails_against_the_full_runs():
    """Iteration 5 off by 3e-3 in every resumed run: the resumed-vs-resumed checks cannot see
    it, the comparison with the uninterrupted runs does."""
    runs = good_runs()
    for run in car.RESUMED[:4]:
        runs[run] = {**runs[run], 5: runs[run][5] * (1 + 3e-3)}
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == [
        "te_to_te vs te_full", "torch_to_torch vs torch_full", "te_to_torch vs te_full",
        "torch_to_te vs torch_full",
    ]  # fmt: skip


def test_diagnostic_runs_are_reported_against_te_full_not_checked():
    runs = good_runs()
    runs["te_to_te_eager"] = logged({i: FULL[i] * (1 + 1e-2) for i in (4, 5, 6)})
    result = car.verdict(runs)
    assert result["summary"]["n_failed"] == 0
    diag = result["diagnostics"]
    assert set(diag) == {"te_to_te_eager"}
    for i in (4, 5, 6):
        assert abs(diag["te_to_te_eager"][i] - 1e-2) < 1e-12


def test_uninterrupted_runs_that_part_ways_fail():
    """The H200 logs before the learning-rate fix: torch_full 5.4e-4 off at iteration 6."""
    runs = good_runs()
    runs["torch_full"] = logged({i: v * (1 + 5.4e-4 * (i == 6)) for i, v in FULL.items()})
    failed = [c["name"] for c in car.verdict(runs)["checks"] if not c["passed"]]
    assert failed == ["te_full and torch_full agree"]  # the tolerance widens with the noise
