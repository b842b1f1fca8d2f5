"""README's performance table and plot come from the committed benchmark results."""

from __future__ import annotations

import json
import shutil

import pytest
from project_paths import load_script


def _report():
    return load_script("scripts/perf_report.py")


def test_readme_table_and_plot_are_current(capsys):
    """Fails when a results file changed (or was added to RESULTS) without regenerating."""
    assert _report().main(["--check"]) == 0, capsys.readouterr().out


def test_every_system_in_the_results_has_a_label():
    report = _report()
    systems = {row.system for row in report.load_rows()}
    assert systems and systems <= set(report.LABELS), systems - set(report.LABELS)


def test_a_changed_result_changes_table_and_plot(tmp_path):
    """A different measurement gives a different row, and the README check would see it."""
    report = _report()
    names = report.RESULTS
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report.RESULTS_DIR / name, tmp_path / name)
    # The first file with HF and this system in one call (the ratio is against that HF).
    for name in names:
        path = tmp_path / name
        data = json.loads(path.read_text())
        case = next(iter(data["cases"]))
        if {"hf", "ours_te_graph_opt_bf"} <= set(data["cases"][case]["systems"]):
            break
    ours = data["cases"][case]["systems"]["ours_te_graph_opt_bf"]
    ours["median_ms"] *= 2
    ours["tok_s"] /= 2
    path.write_text(json.dumps(data))
    before, after = report.load_rows(), report.load_rows(tmp_path, names)
    assert report.table(before) != report.table(after)
    assert report.plot(before) != report.plot(after)
    readme = report.README.read_text()
    assert report.readme_with_table(readme, after) != readme
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    assert len(changed) == 1, changed
    old_row, new_row = changed[0]
    assert new_row.system == "ours_te_graph_opt_bf"
    assert new_row.over_hf == pytest.approx(old_row.over_hf / 2)


def test_ratio_only_against_hf_of_the_same_file():
    """The distributed-optimizer file has no HF run: its rows show no ratio rather than one
    against another call's HF."""
    report = _report()
    rows = [r for r in report.load_rows() if r.source == "h200/falcon_h1/bench_falcon_h1_dist.json"]
    assert rows and all(r.over_hf is None for r in rows)
    assert all(f"| - | {r.mfu:.1%}" in report.table(rows) for r in rows)


def test_missing_markers_are_an_error_naming_the_readme():
    report = _report()
    with pytest.raises(SystemExit, match="README.md needs exactly one"):
        report.readme_with_table("no markers here\n", report.load_rows())


def test_rows_name_the_device_of_their_file():
    """H100 and H200 files sit in one table: each row says which GPU measured it."""
    report = _report()
    rows = report.load_rows()
    assert {r.device for r in rows} == {"H100", "H200"}
    assert all(r.device == r.source[:4].upper() for r in rows)
    assert report.short_device("NVIDIA H100 80GB HBM3") == "H100"
    assert report.short_device("NVIDIA H200") == "H200"


def test_ratio_just_below_a_target_does_not_read_as_met():
    """2.4972x HF (the no-TE launcher run) must not print as 2.50, the target it misses."""
    report = _report()
    rows = [
        r
        for r in report.load_rows()
        if r.source == "h100/falcon_h1/bench_falcon_h1_no_te_launcher_279cb2e.json"
        and r.system != "hf"
    ]
    assert len(rows) == 1 and 2.49 < rows[0].over_hf < 2.5
    text = report.table(rows)
    assert f"| {rows[0].over_hf:.3f} |" in text and "| 2.50 |" not in text


def test_ratios_use_the_benchmarks_reference_hf(tmp_path):
    """The table divides by the call's reference HF (``hf_tok_s``, the faster of two plain HF
    runs where the benchmark made two), not by the ``hf`` run itself."""
    report = _report()
    name = "h100/falcon_h1/bench_falcon_h1_deep_ba9b54d.json"
    (tmp_path / name).parent.mkdir(parents=True)
    data = json.loads((report.RESULTS_DIR / name).read_text())
    entry = next(iter(data["cases"].values()))
    entry["hf_tok_s"] = entry["systems"]["hf"]["tok_s"] * 1.25
    (tmp_path / name).write_text(json.dumps(data))
    before = {r.system: r for r in report.load_rows(names=(name,))}
    after = {r.system: r for r in report.load_rows(tmp_path, (name,))}
    ours = "ours_te_graph_opt_bf_tadam_norerun_tce"
    assert after[ours].over_hf == pytest.approx(before[ours].over_hf / 1.25)
    assert after["hf"].over_hf == pytest.approx(0.8)
