"""Upstream's lint rules on the series: `check --lint report|strict` and `format`.

The pure functions of ``scripts/upstream_lint.py`` are tested directly; `check` and `format` run
on the toy project with upstream's pinned tools from ``.venv-lint`` (``make lint-venv``), on an
upstream commit that carries black/isort/pylint config like the real one and a file whose own
lines are not formatted (those must stay untouched and unreported).
"""

from __future__ import annotations

import datetime
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from patchset_testlib import LINT_VENV, REPO_ROOT, write_files, write_pin
from project_paths import use

use("scripts")
import upstream_lint as ul  # noqa: E402

YEAR = datetime.date.today().year
HEADER = f"# Copyright (c) {YEAR} NVIDIA CORPORATION & AFFILIATES. All rights reserved.\n"


# -- pure functions ---------------------------------------------------------------------------


def test_series_lines_and_hunks():
    pin = "a = 1\nb = 2\nc = 3\n"
    assert ul.series_lines(None, pin) is None
    assert ul.series_lines(pin, "a = 1\nx = 9\nb = 2\nc = 3\n") == {2}
    assert ul.series_lines(pin, "a = 1\nc = 3\n") == {1, 2}  # a deletion touches its neighbours

    text = "x = (1,\n  2)\n" + "keep = 1\n" * 10 + "y = [3,\n  4]\n"
    formatted = "x = (1, 2)\n" + "keep = 1\n" * 10 + "y = [3, 4]\n"
    hunks = ul.formatter_hunks(text, formatted)
    assert [sorted(ul.hunk_lines(h)) for h in hunks] == [[1, 2], [13, 14]]
    # With 3 lines of context (black --diff) nearby changes join into one hunk.
    assert len(ul.formatter_hunks(text, formatted, context=3)) == 2
    close = "x = (1,\n  2)\nkeep = 1\ny = [3,\n  4]\n"
    assert len(ul.formatter_hunks(close, "x = (1, 2)\nkeep = 1\ny = [3, 4]\n", 3)) == 1
    # Only the hunk that touches line 13 (the series' line) is applied.
    assert ul.apply_hunks(text, formatted, {13}) == "x = (1,\n  2)\n" + "keep = 1\n" * 10 + (
        "y = [3, 4]\n"
    )
    assert ul.apply_hunks(text, formatted, None) == formatted
    assert ul.apply_hunks(text, formatted, {5}) == text


def test_header_check_and_fix():
    assert ul.header_problem("a.py", HEADER + '"""Doc."""\n') is None
    assert ul.header_problem("a.py", "#!/usr/bin/env python3\n" + HEADER) is None
    assert ul.header_problem("a.py", HEADER.replace(str(YEAR), f"2019-{YEAR}")) is None
    for bad in (
        "# Copyright (c) 2026, NVIDIA CORPORATION. All rights reserved.\n",
        "# Copyright (c) 2026, falcon-mcore contributors. All rights reserved.\n",
        f"# Copyright (c) {YEAR + 1} NVIDIA CORPORATION & AFFILIATES. All rights reserved.\n",
        '"""No header."""\n',
        "",
    ):
        line, message = ul.header_problem("a.py", bad)
        assert line == 1 and "NVIDIA CORPORATION & AFFILIATES" in message
    # A copyright first line is replaced (not duplicated); otherwise the header is inserted.
    assert ul.fix_header("# Copyright (c) 2025 Someone.\nx = 1\n") == HEADER + "x = 1\n"
    assert ul.fix_header('"""Doc."""\n') == HEADER + '"""Doc."""\n'
    assert ul.fix_header("#!/bin/sh-ish\nx = 1\n") == "#!/bin/sh-ish\n" + HEADER + "x = 1\n"
    assert ul.fix_header(HEADER + "x = 1\n") == HEADER + "x = 1\n"


def test_scope():
    changes = {"megatron/core/a.py": "x", "megatron/training/b.py": "y", "tools/new.py": None}
    assert ul.isort_exempt(changes) == {"megatron/training/b.py"}
    assert ul.in_upstream_ci_scope("tests/unit_tests/t.py")
    assert not ul.in_upstream_ci_scope("megatron/training/b.py")


def test_project_strings():
    text = 'a = "see scripts/run.sh"\nb = "falcon-mcore"\nc = "tools/scripts/x"\nd = 1\n'
    found = ul.project_string_findings("m.py", text, None)
    assert [f.line for f in found] == [1, 2]
    assert [f.line for f in ul.project_string_findings("m.py", text, {2, 3, 4})] == [2]


def test_lint_requirements_match_the_pin():
    """requirements/lint.txt pins what upstream's uv.lock locks for its `linting` group."""
    cache = Path.home() / ".cache" / "falcon-mcore" / "Megatron-LM.git"
    sha = re.search(r"^sha\s*=\s*(\w+)", (REPO_ROOT / "UPSTREAM").read_text(), re.M).group(1)
    proc = subprocess.run(
        ["git", "-C", str(cache), "show", f"{sha}:uv.lock"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"the upstream cache {cache} does not hold the pin {sha}")
    locked = {p["name"]: p.get("version") for p in tomllib.loads(proc.stdout)["package"]}
    pins = dict(
        line.split("==")
        for line in (REPO_ROOT / "requirements/lint.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins == {name: locked[name] for name in pins}
    assert {"black", "isort", "pylint", "ruff"} <= set(pins)
    autoformat = subprocess.run(
        ["git", "-C", str(cache), "show", f"{sha}:tools/autoformat.sh"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "black " + " ".join(ul.BLACK_ARGS) in autoformat


# -- check and format on the toy project ------------------------------------------------------

PYPROJECT = """\
[tool.isort]
profile = "black"
line_length = 100
known_first_party = ["megatron"]

[tool.black]
line_length = 100
skip_string_normalization = true
skip_magic_trailing_comma = true

[tool.ruff.lint]
select = ["S506"]
"""
PYLINTRC = """\
[MAIN]
ignore-paths=tests
max-line-length=100
[MESSAGES CONTROL]
disable=all
enable=C0115,C0116,W0611,C0301
"""
# Upstream's own lines 4-5 are not black-formatted; the series edits the function at the end.
UGLY = (
    '"""An upstream module with unformatted lines of its own."""\n'
    "\n"
    "\n"
    "OWN = [1,\n"
    "       2]\n"
    "\n"
    "\n"
    "def scale(x):\n"
    '    """Scale."""\n'
    "    return x\n"
)
PATCHED_UGLY = UGLY.replace(
    "    return x\n", "    factor = dict(a = 1)\n    return x * factor['a']\n"
)
NEW_FILE = 'import os\nimport sys\n"""Not first."""\n\ndef helper( x ):\n    return (sys, os, x)\n'


@pytest.fixture
def lint_proj(proj):
    """The toy project on an upstream commit with lint config and an unformatted module, with
    one patch that edits that module and one badly formatted overlay file."""
    if not (LINT_VENV / "bin" / "black").exists():
        pytest.fail(f"{LINT_VENV} is missing: run `make lint-venv`")
    p = proj
    write_files(
        p.upstream,
        {"pyproject.toml": PYPROJECT, ".pylintrc": PYLINTRC, "megatron/core/ugly.py": UGLY},
    )
    p.git(p.upstream, "add", "-A")
    p.git(p.upstream, "commit", "-q", "-m", "toy upstream: lint config")
    p.sha = p.git(p.upstream, "rev-parse", "HEAD")
    write_pin(p.root, str(p.upstream), p.sha)
    p.ok("upstream")
    p.ok("apply")
    p.commit_in_build({"megatron/core/ugly.py": PATCHED_UGLY}, "ugly: scale by a factor")
    p.commit_in_build({"megatron/core/alpha/helper.py": NEW_FILE}, "alpha: a helper")
    p.ok("export")
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text().replace(
            'patches = ["config-add-the-beta-flag"]',
            'patches = ["config-add-the-beta-flag", "ugly-scale-by-a-factor"]',
        )
    )
    return p


def lint_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[lint] ")]


def test_check_reports_series_findings_only(lint_proj):
    p = lint_proj
    venv = ["--lint-venv", str(LINT_VENV)]
    proc = p.ok("check", "--lint", "report", *venv)
    lines = lint_lines(proc.stdout)
    helper = "megatron/core/alpha/helper.py"
    # The new file: header, black, isort and pylint findings.
    assert any(f"{helper}:1: [header]" in line for line in lines), lines
    assert any(line.startswith(f"[lint] {helper}:") and "[black]" in line for line in lines)
    assert any(line.startswith(f"[lint] {helper}:") and "[isort]" in line for line in lines)
    assert any(f"{helper}:5: [pylint] C0116" in line for line in lines), lines
    # The changed upstream file: the patch's line, not upstream's own lines 4-5, which are a note.
    ugly = [line for line in lines if line.startswith("[lint] megatron/core/ugly.py:")]
    assert ugly == ["[lint] megatron/core/ugly.py:10: [black] would reformat lines 10-10"], lines
    assert any("note: megatron/core/ugly.py" in line for line in lines)
    # Toy patch 0002 adds an entry to config.py's dict, which black would join into one line.
    assert any("megatron/core/config.py:" in line and "[black]" in line for line in lines)
    assert "LINT=report: not failing" in proc.stdout

    proc = p.fails("check", "--lint", "strict", *venv)
    assert "findings of upstream's lint rules" in proc.stderr and "make format" in proc.stderr
    assert "[lint]" not in p.ok("check").stdout  # --lint off (the tool's default)

    missing = p.fails("check", "--lint", "report", "--lint-venv", str(p.tmp / "none"))
    assert "make lint-venv" in missing.stderr


def test_format_then_strict_check_passes(lint_proj):
    p = lint_proj
    venv = ["--lint-venv", str(LINT_VENV)]
    patch = p.patch("0003-ugly-scale-by-a-factor.patch")
    p.ok("format", *venv)

    # The patch now adds formatted code; upstream's own lines are still as upstream wrote them.
    text = patch.read_text()
    assert "+    factor = dict(a=1)\n" in text and "dict(a = 1)" not in text
    assert "OWN = [1,\n       2]\n" in p.bgit("show", "HEAD:megatron/core/ugly.py") + "\n"
    assert "-OWN" not in text and "+OWN" not in text
    helper = (p.root / "megatron_overlay/megatron/core/alpha/helper.py").read_text()
    assert helper.startswith(HEADER + "import os\nimport sys\n")
    assert "def helper(x):" in helper
    # The tree was rebuilt from patches/ and every commit rewritten; subjects and order kept.
    subjects = p.bgit("log", "--reverse", "--format=%s", f"{p.sha}..HEAD").splitlines()
    assert subjects == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "ugly: scale by a factor",
        "alpha: add falcon-mcore overlay files",
        "beta: add falcon-mcore overlay files",
    ]
    p.ok("guard")

    # What is left is what a formatter cannot fix: the helper's missing docstring.
    proc = p.run("check", "--lint", "strict", *venv)
    assert proc.returncode == 2
    findings = [line for line in lint_lines(proc.stdout) if "note:" not in line]
    assert len(findings) == 2 and "C0116" in findings[0], findings
    assert findings[1].startswith("[lint] 1 findings"), findings
    # With the docstring written, the strict check passes and format has nothing left to do.
    p.ok("apply")
    fixed = helper.replace("def helper(x):\n", 'def helper(x):\n    """Help."""\n')
    p.commit_in_build({"megatron/core/alpha/helper.py": fixed}, "alpha: document the helper")
    p.ok("export")
    proc = p.ok("check", "--lint", "strict", *venv)
    assert "upstream lint: no findings" in proc.stdout
    assert "nothing to format" in p.ok("format", *venv).stdout
