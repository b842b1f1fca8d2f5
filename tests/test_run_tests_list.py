"""`make test` runs every unit test the overlay ships (ci/upstream_unit_tests.txt lists them).

A test file added under megatron_overlay/tests/ but missing from that list would be copied into
the patched tree and never run; this check fails instead.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "ci" / "upstream_unit_tests.txt"
OVERLAY = ROOT / "megatron_overlay"


def listed() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in LIST.read_text().splitlines())
    return {line for line in lines if line}


def test_every_overlay_test_file_is_listed():
    shipped = {str(p.relative_to(OVERLAY)) for p in OVERLAY.glob("tests/**/test_*.py")}
    assert shipped, "no overlay tests found: wrong path?"
    missing = sorted(shipped - listed())
    assert not missing, f"{LIST.name} does not list (so `make test` never runs): {missing}"
