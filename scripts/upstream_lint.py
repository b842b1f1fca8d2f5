"""Upstream Megatron-LM's lint rules, applied to what the falcon-mcore series adds or changes.

Upstream's CI (``tools/autoformat.sh`` with ``CHECK_ONLY=true``, tools from the ``linting``
group of its ``uv.lock``) runs black (``--skip-magic-trailing-comma
--skip-string-normalization``), isort, pylint (``.pylintrc``: docstrings, unused imports, line
length, print) and ``ruff check`` on changed files, reading the config in the tree's
``pyproject.toml`` / ``.pylintrc``; its copyright checks want the first line of a new file to be
``# Copyright (c) <year> NVIDIA CORPORATION & AFFILIATES. All rights reserved.``.

This module runs the same tools (from a separate virtualenv, ``make lint-venv``) inside a tree
that holds the series, with the tree's own config, and judges:

* files the series adds: every finding;
* upstream files the series changes: only findings on lines the series added or changed (a
  region the formatter would change counts when it touches such a line). Upstream's own lines
  are not the series' business; the pinned black reformats some of them (upstream CI would ask
  a PR that touches such a file to format the whole file: those files are listed as notes).

Scope as upstream CI's (``megatron/core`` and ``tests/``) for pylint and ruff; black, headers
and project strings on every file; isort on new files and on changed files in that scope.

It also formats (``make format``): new files completely (header, black, isort), changed
upstream files only in the hunks that touch the series' lines. Only the standard library is
used; the tools run as subprocesses.
"""

from __future__ import annotations

import ast
import datetime
import difflib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HEADER_TEMPLATE = "# Copyright (c) {year} NVIDIA CORPORATION & AFFILIATES. All rights reserved."
HEADER_RE = re.compile(
    r"# Copyright \(c\) (?P<first>\d{4})(-(?P<last>\d{4}))? NVIDIA CORPORATION & AFFILIATES\. "
    r"All rights reserved\.$"
)
# A first line that is some copyright notice (replaced by ``format``, never duplicated).
ANY_COPYRIGHT_RE = re.compile(r"^#.*\bcopyright\b", re.I)
BLACK_ARGS = ["--skip-magic-trailing-comma", "--skip-string-normalization"]
TOOLS = ("black", "isort", "pylint", "ruff")
# Strings that name this project or its own directories; upstream code must not contain them.
PROJECT_STRINGS_RE = re.compile(
    r"falcon[-_]mcore|megatron_overlay|DESIGN\.md|(?<![\w./-])(?:scripts|results)/"
)
# Changes of a formatter closer than this many unchanged lines form one hunk. 0: each changed
# region is judged (and applied) on its own, so upstream's own lines next to the series' lines
# are neither reported nor reformatted; ``format`` falls back to black's own 3 lines of context
# where applying the regions separately would not parse.
CONTEXT = 0


@dataclass(frozen=True)
class Finding:
    """One problem: ``tool`` (header, black, isort, pylint, ruff, project-strings), where, what."""

    tool: str
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.tool}] {self.message}"


class LintError(Exception):
    """The tools are missing or failed in a way that says nothing about the code."""


# --------------------------------------------------------------------------------------------
# lines and hunks


def series_lines(pin_text: str | None, text: str) -> set[int] | None:
    """1-based line numbers of ``text`` that the series added or changed; None = new file."""
    if pin_text is None:
        return None
    old, new = pin_text.splitlines(), text.splitlines()
    lines: set[int] = set()
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "insert"):
            lines.update(range(j1 + 1, j2 + 1))
        elif tag == "delete":
            # A deletion is "on" the lines around it.
            lines.update({j1, j1 + 1})
    return lines


def formatter_hunks(
    text: str, formatted: str, context: int = CONTEXT
) -> list[list[tuple[str, int, int, int, int]]]:
    """The changes from ``text`` to ``formatted``, grouped into hunks like ``diff -U<context>``."""
    old, new = text.splitlines(keepends=True), formatted.splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return [
        [op for op in group if op[0] != "equal"]
        for group in matcher.get_grouped_opcodes(context)
        if any(op[0] != "equal" for op in group)
    ]


def hunk_lines(hunk: list[tuple[str, int, int, int, int]]) -> set[int]:
    """1-based lines of the original text that a hunk changes (an insertion touches both
    neighbours)."""
    lines: set[int] = set()
    for _tag, i1, i2, _j1, _j2 in hunk:
        lines.update(range(i1 + 1, i2 + 1) if i2 > i1 else {i1, i1 + 1})
    return lines


def ours(hunk_or_line, lines: set[int] | None) -> bool:
    """True when a hunk (or line number) touches the series' lines (always, for a new file)."""
    if lines is None:
        return True
    if isinstance(hunk_or_line, int):
        return hunk_or_line in lines
    return bool(hunk_lines(hunk_or_line) & lines)


def apply_hunks(text: str, formatted: str, lines: set[int] | None, context: int = CONTEXT) -> str:
    """``text`` with only those formatter hunks applied that touch ``lines``."""
    old, new = text.splitlines(keepends=True), formatted.splitlines(keepends=True)
    chosen = set()
    for hunk in formatter_hunks(text, formatted, context):
        if ours(hunk, lines):
            chosen.update(hunk)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    out: list[str] = []
    for op in matcher.get_opcodes():
        tag, i1, i2, j1, j2 = op
        out.extend(new[j1:j2] if tag != "equal" and op in chosen else old[i1:i2])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# headers and project strings


def header_problem(path: str, text: str) -> tuple[int, str] | None:
    """(line, message) when a new file lacks upstream's copyright header, else None.

    The header is the first line; a script's ``#!`` line may come before it.
    """
    lines = text.splitlines()
    index = 1 if lines and lines[0].startswith("#!") else 0
    line = lines[index] if len(lines) > index else ""
    match = HEADER_RE.match(line)
    if match:
        year = int(match.group("last") or match.group("first"))
        if 2019 <= year <= datetime.date.today().year:
            return None
    expected = HEADER_TEMPLATE.format(year=datetime.date.today().year)
    return index + 1, f"copyright header must be line {index + 1}: {expected!r} (got {line!r})"


def fix_header(text: str) -> str:
    """``text`` with upstream's header: a copyright first line is replaced, else one is added."""
    if header_problem("", text) is None:
        return text
    lines = text.splitlines(keepends=True)
    index = 1 if lines and lines[0].startswith("#!") else 0
    header = HEADER_TEMPLATE.format(year=datetime.date.today().year) + "\n"
    if len(lines) > index and ANY_COPYRIGHT_RE.match(lines[index]):
        lines[index] = header
    else:
        lines.insert(index, header)
    return "".join(lines)


def project_string_findings(path: str, text: str, lines: set[int] | None) -> list[Finding]:
    """Lines (of the series) that name the project or its own directories."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if ours(number, lines) and PROJECT_STRINGS_RE.search(line):
            found.append(Finding("project-strings", path, number, line.strip()[:120]))
    return found


# --------------------------------------------------------------------------------------------
# running the tools


def tool_path(venv: Path, tool: str) -> Path:
    path = venv / "bin" / tool
    if not path.exists():
        raise LintError(
            f"{path} is missing: create the lint tools with `make lint-venv` "
            "(requirements/lint.txt, upstream's pinned versions)"
        )
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["BLACK_CACHE_DIR"] = env.get("BLACK_CACHE_DIR") or tempfile.gettempdir() + "/black-cache"
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)


def run_in_place(
    venv: Path,
    tree: Path,
    texts: dict[str, str],
    tools: tuple[str, ...],
    fast: bool = False,
    no_isort: frozenset[str] = frozenset(),
) -> tuple[dict[str, str], list[Finding]]:
    """Write ``texts`` into ``tree``, run the formatters ``tools`` in place (in that order, as
    upstream's autoformat.sh does), return {path: formatted text} and the files a tool could not
    parse. The files are left formatted: callers write back what they want. ``fast`` skips
    black's AST safety check (for checking only: the output is compared, never kept); isort
    leaves the files in ``no_isort`` alone."""
    for rel, text in texts.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    failures: list[Finding] = []
    paths = sorted(texts)
    for tool in tools:
        if not paths:
            break
        if tool == "black":
            cmd = [str(tool_path(venv, "black")), "-q", *BLACK_ARGS]
            cmd += ["--fast"] if fast else []
            cmd += paths
        elif tool == "isort":
            sortable = [p for p in paths if p not in no_isort]
            if not sortable:
                continue
            cmd = [str(tool_path(venv, "isort")), "-q", *sortable]
        else:
            raise ValueError(tool)
        proc = _run(cmd, tree)
        if proc.returncode != 0:
            # black: exit 123 when a file cannot be parsed; the message names it.
            bad = [p for p in paths if p in proc.stderr]
            for rel in bad or paths:
                failures.append(
                    Finding(tool, rel, 1, f"{tool} failed: " + proc.stderr.strip()[-300:])
                )
            paths = [p for p in paths if p not in bad]
            if not bad:
                break
    return {rel: (tree / rel).read_text() for rel in texts}, failures


def formatter_findings(
    venv: Path,
    tree: Path,
    texts: dict[str, str],
    lines: dict[str, set[int] | None],
    no_isort: frozenset[str] = frozenset(),
) -> tuple[list[Finding], set[str]]:
    """black and isort, each on the original text (as in CI), judged on the series' lines.

    Returns the findings and the upstream files in which a formatter would also change lines
    that the series did not touch (upstream's own formatting)."""
    findings: list[Finding] = []
    own: set[str] = set()
    try:
        for tool in ("black", "isort"):
            formatted, failures = run_in_place(
                venv, tree, texts, (tool,), fast=True, no_isort=no_isort
            )
            findings += failures
            failed = {f.path for f in failures}
            for rel, text in texts.items():
                if rel in failed or formatted[rel] == text:
                    continue
                for hunk in formatter_hunks(text, formatted[rel]):
                    if not ours(hunk, lines[rel]):
                        own.add(rel)
                        continue
                    first = min(hunk_lines(hunk) - {0}, default=1)
                    last = max(hunk_lines(hunk))
                    what = "would reformat" if tool == "black" else "would re-sort imports"
                    findings.append(Finding(tool, rel, first, f"{what} lines {first}-{last}"))
    finally:
        for rel, text in texts.items():
            (tree / rel).write_text(text)
    return findings, own


def pylint_findings(
    venv: Path, tree: Path, paths: list[str], lines: dict[str, set[int] | None]
) -> list[Finding]:
    """pylint with the tree's ``.pylintrc`` (upstream's enabled messages; tests/ ignored)."""
    if not paths:
        return []
    template = "{path}:{line}:{msg_id}:{msg} ({symbol})"
    cmd = [str(tool_path(venv, "pylint")), "-sn", "--persistent=n", f"--msg-template={template}"]
    proc = _run(cmd + paths, tree)
    if proc.returncode & 32:
        raise LintError(f"pylint failed to run (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    findings = []
    for out in proc.stdout.splitlines():
        match = re.match(r"^(.+?):(\d+):([A-Z]\d{4}):(.*)$", out)
        if match and match.group(1) in lines:
            rel, number = match.group(1), int(match.group(2))
            if ours(number, lines[rel]):
                findings.append(
                    Finding("pylint", rel, number, f"{match.group(3)} {match.group(4)}")
                )
    return findings


def ruff_findings(
    venv: Path, tree: Path, paths: list[str], lines: dict[str, set[int] | None]
) -> list[Finding]:
    """``ruff check`` with the tree's ``pyproject.toml``."""
    if not paths:
        return []
    cmd = [str(tool_path(venv, "ruff")), "check", "--no-fix", "--no-cache"]
    proc = _run(cmd + ["--output-format=concise", *paths], tree)
    if proc.returncode not in (0, 1):
        raise LintError(f"ruff failed to run (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    findings = []
    for out in proc.stdout.splitlines():
        match = re.match(r"^(.+?):(\d+):\d+: (.*)$", out)
        if match and match.group(1) in lines:
            rel, number = match.group(1), int(match.group(2))
            if ours(number, lines[rel]):
                findings.append(Finding("ruff", rel, number, match.group(3)))
    return findings


# --------------------------------------------------------------------------------------------
# the tree-level entry points

# Upstream's CI (tools/autoformat.sh) lints changed files under megatron/core and tests/ only.
# There: every tool. Elsewhere: black, the header and the project strings on every file the
# series adds or changes, isort on new files only (upstream's own import blocks outside that
# scope are often unsorted, and sorting them would rewrite upstream's lines), no pylint/ruff.
UPSTREAM_CI_SCOPE = ("megatron/core/", "tests/")


def in_upstream_ci_scope(rel: str) -> bool:
    return rel.startswith(UPSTREAM_CI_SCOPE)


def isort_exempt(changes: dict[str, str | None]) -> frozenset[str]:
    """Changed upstream files outside upstream's CI scope: isort leaves them alone."""
    return frozenset(
        rel for rel, pin in changes.items() if pin is not None and not in_upstream_ci_scope(rel)
    )


def _cache_key(salt: str, rel: str, pin_text: str | None, text: str) -> str:
    h = hashlib.sha256(salt.encode())
    for part in (rel, "\0new\0" if pin_text is None else pin_text, text):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def tools_salt(venv: Path, tree: Path) -> str:
    """What lint results depend on besides the file: tool versions and the tree's config."""
    parts = [str(sorted(p.name for p in (venv / "lib").glob("python*/site-packages/*.dist-info")))]
    for name in ("pyproject.toml", ".pylintrc"):
        path = tree / name
        parts.append(path.read_text() if path.is_file() else "")
    parts.append(Path(__file__).read_text())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def lint_files(
    venv: Path, tree: Path, changes: dict[str, str | None], cache_file: Path | None = None
) -> tuple[list[Finding], list[str]]:
    """Findings for the files of ``tree`` that the series adds or changes, and notes.

    ``changes`` maps each such path (relative to ``tree``, which holds the series) to the file's
    text at the pin, or None for a new file. Results are cached per file in ``cache_file``
    (keyed by the file, its pin text, the tool versions and the tree's config).
    """
    texts = {rel: (tree / rel).read_text() for rel in changes}
    lines = {rel: series_lines(changes[rel], texts[rel]) for rel in changes}
    salt = tools_salt(venv, tree)
    keys = {rel: _cache_key(salt, rel, changes[rel], texts[rel]) for rel in changes}
    cache: dict[str, dict] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    todo = sorted(rel for rel in changes if keys[rel] not in cache)
    found: dict[str, list[Finding]] = {rel: [] for rel in todo}
    unformatted: set[str] = set()
    for rel in todo:
        if changes[rel] is None and rel.endswith(".py"):
            problem = header_problem(rel, texts[rel])
            if problem:
                found[rel].append(Finding("header", rel, *problem))
        found[rel] += project_string_findings(rel, texts[rel], lines[rel])
    py = [rel for rel in todo if rel.endswith(".py")]
    if py:
        formatted, own = formatter_findings(
            venv,
            tree,
            {rel: texts[rel] for rel in py},
            {rel: lines[rel] for rel in py},
            isort_exempt({rel: changes[rel] for rel in py}),
        )
        unformatted |= own
        scoped = [rel for rel in py if in_upstream_ci_scope(rel)]
        for finding in (
            formatted
            + pylint_findings(venv, tree, scoped, lines)
            + ruff_findings(venv, tree, scoped, lines)
        ):
            found[finding.path].append(finding)
    for rel in todo:
        cache[keys[rel]] = {
            "findings": [[f.tool, f.path, f.line, f.message] for f in found[rel]],
            "upstream_unformatted": rel in unformatted,
        }
    if cache_file is not None and todo:
        live = set(keys.values())
        kept = {k: v for k, v in cache.items() if k in live}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(kept, indent=0, sort_keys=True))
    findings = [Finding(*f) for rel in changes for f in cache[keys[rel]]["findings"]]
    notes = sorted(rel for rel in changes if cache[keys[rel]]["upstream_unformatted"])
    return sorted(findings, key=lambda f: (f.path, f.line, f.tool)), notes


def _partial(pin: str, text: str, formatted: str) -> str | None:
    """``text`` with the formatter hunks that touch the series' lines, as Python that parses
    (separate regions first, black's 3-line hunks where that does not parse), or None."""
    lines = series_lines(pin, text)
    for context in (CONTEXT, 3):
        candidate = apply_hunks(text, formatted, lines, context)
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue
        return candidate
    return None


def format_files(
    venv: Path, tree: Path, files: dict[str, tuple[str | None, str]], max_rounds: int = 5
) -> tuple[dict[str, str], list[Finding]]:
    """Formatted texts for ``files`` ({path: (pin text or None, text)}), written in ``tree``.

    New files: header, then black and isort on the whole file. Upstream files: black + isort
    hunks that touch the series' lines, repeated until nothing changes (a formatted hunk makes
    its lines the series' lines, which can join a neighbouring hunk).
    """
    result = {
        rel: (fix_header(text) if pin is None else text) for rel, (pin, text) in files.items()
    }
    failures: list[Finding] = []
    pending = dict(result)
    for _ in range(max_rounds):
        if not pending:
            break
        formatted, failed = run_in_place(
            venv,
            tree,
            pending,
            ("black", "isort"),
            no_isort=isort_exempt({rel: files[rel][0] for rel in pending}),
        )
        failures += failed
        bad = {f.path for f in failed}
        changed = {}
        for rel, text in pending.items():
            if rel in bad:
                continue
            pin = files[rel][0]
            new = formatted[rel] if pin is None else _partial(pin, text, formatted[rel])
            if new is None:
                failures.append(
                    Finding(
                        "black", rel, 1, "cannot format the series' lines alone; format by hand"
                    )
                )
                continue
            if new != text:
                changed[rel] = new
        result.update(changed)
        pending = changed
    for rel, text in result.items():
        (tree / rel).write_text(text)
    return result, failures
