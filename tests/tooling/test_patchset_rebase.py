"""`make rebase-upstream` / `check-base`: the series on a second upstream base (UPSTREAM_MAIN).

A patch that conflicts there is resolved once, interactively (git am stops in
build/rebase/<short>/Megatron-LM), and the resolved patch is kept in
patches/bases/<short>/ with the fingerprint of the patch it resolves; `check-base` applies the
series with those resolutions and fails, naming the file, when one is stale, missing or orphaned.
"""

from __future__ import annotations

import re

from patchset_testlib import PATCH_NAMES, UPSTREAM_FILES, git

P1, P2 = PATCH_NAMES
LAYERS = UPSTREAM_FILES["megatron/core/layers.py"]


def upstream_commit(p, files: dict[str, str], message: str) -> str:
    """Add a commit to the toy upstream repository (on its main branch); return its sha."""
    for rel, text in files.items():
        path = p.upstream / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(p.upstream, "add", "-A")
    git(p.upstream, "commit", "-q", "-m", message, date="2024-06-01T00:00:00+00:00")
    return git(p.upstream, "rev-parse", "HEAD")


def write_main(p, sha: str) -> None:
    """The project's UPSTREAM_MAIN: the second base."""
    (p.root / "UPSTREAM_MAIN").write_text(
        f"# Toy second base.\nurl = {p.upstream}\nbranch = main\nsha = {sha}\n"
    )


def conflicting_main(p) -> str:
    """An upstream commit on which P1 (alpha hook before `return layers`) conflicts."""
    layers = LAYERS.replace("    return layers\n", "    return tuple(layers)\n")
    return upstream_commit(p, {"megatron/core/layers.py": layers}, "upstream: return a tuple")


def resolve_p1(p, new: str) -> None:
    """Stop at P1's conflict, resolve it as a person would, continue to the end."""
    proc = p.fails("rebase")
    wt = p.root / "build" / "rebase" / new[:12] / "Megatron-LM"
    assert f"patches/{P1} conflicts" in proc.stderr
    assert "megatron/core/layers.py" in proc.stderr and "git am --continue" in proc.stderr
    assert "CONTINUE=1" in proc.stderr
    assert "<<<<<<<" in (wt / "megatron/core/layers.py").read_text()
    resolved = LAYERS.replace(
        "    return layers\n", "    layers = alpha_hook(layers)\n    return tuple(layers)\n", 1
    )
    (wt / "megatron/core/layers.py").write_text(resolved)
    git(wt, "add", "-A")
    git(wt, "am", "--continue")
    proc = p.ok("rebase", "--continue")
    assert f"1 through resolutions in patches/bases/{new[:12]}/" in proc.stdout


def test_rebase_clean(proj):
    p = proj
    # A change that moves the patched lines (3-way / offset needed) and one elsewhere.
    layers = LAYERS.replace(
        '"""Layers of the toy upstream."""\n',
        '"""Layers of the toy upstream."""\n\nimport os\n\nDEBUG = os.environ.get("DEBUG")\n',
    )
    new = upstream_commit(
        p, {"README.md": "# Toy upstream, v2\n", "megatron/core/layers.py": layers}, "v2"
    )
    before = p.managed_snapshot()
    proc = p.ok("rebase", "--base", new)
    assert "2 patches apply as they are (3-way allowed); 0 through resolutions" in proc.stdout
    assert "range-diff of the series, pin..new:" in proc.stdout
    branch = f"rebase/{new[:12]}"
    log = p.bgit("log", "--reverse", "--format=%s", f"{new}..{branch}").splitlines()
    assert log == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "alpha: add falcon-mcore overlay files",
        "beta: add falcon-mcore overlay files",
    ]
    text = p.bgit("show", f"{branch}:megatron/core/layers.py")
    assert "DEBUG = os.environ" in text and "layers = alpha_hook(layers)" in text
    assert p.bgit("show", f"{branch}:megatron/core/beta.py").startswith('"""Beta feature."""')
    range_diff = proc.stdout.split("range-diff of the series, pin..new:")[1]
    for i, subject in enumerate(log[:2], 1):
        assert re.search(rf"^{i}: +[0-9a-f]+ = +{i}: +[0-9a-f]+ {subject}$", range_diff, re.M)
    assert p.managed_snapshot() == before  # nothing to resolve: patches/ untouched
    p.ok("check-base", "--base", new)


def test_conflict_resolved_once_then_checked(proj):
    p = proj
    new = conflicting_main(p)
    write_main(p, new)  # the default base of rebase and check-base
    series = (p.root / "patches/series").read_bytes()
    originals = {name: p.patch(name).read_bytes() for name in PATCH_NAMES}

    proc = p.fails("check-base")
    assert f"patches/{P1} conflicts on upstream {new[:12]}" in proc.stderr
    assert "no resolution in patches/bases/" in proc.stderr
    assert "make rebase-upstream" in proc.stderr
    assert P2 not in proc.stderr.split("error:")[1]

    resolve_p1(p, new)
    res = p.root / "patches" / "bases" / new[:12] / P1
    text = res.read_text()
    assert re.search(rf"^Falcon-Mcore-Resolves: {P1} fingerprint [0-9a-f]{{20}}$", text, re.M)
    assert "+    layers = alpha_hook(layers)\n     return tuple(layers)" in text
    assert sorted(x.name for x in res.parent.iterdir()) == [P1]  # P2 needs none
    # The series itself is never rewritten.
    assert (p.root / "patches/series").read_bytes() == series
    assert {name: p.patch(name).read_bytes() for name in PATCH_NAMES} == originals
    branch_text = p.bgit("show", f"rebase/{new[:12]}:megatron/core/layers.py")
    assert "layers = alpha_hook(layers)\n    return tuple(layers)" in branch_text

    proc = p.ok("check-base")
    assert f"resolved   {P1}" in proc.stdout and f"applies    {P2}" in proc.stdout
    assert "[check-base] OK: 2 patches" in proc.stdout
    p.ok("check")  # patches/bases/ is not export's output: the round trip ignores it
    # A second run reuses the resolution and rewrites nothing.
    snapshot = p.managed_snapshot()
    proc = p.ok("rebase")
    assert "0 through" not in proc.stdout and p.managed_snapshot() == snapshot
    # A PR branch on that base takes the resolution.
    proc = p.ok("pr-branch", "--feature", "alpha", "--base", new)
    assert "return tuple(layers)" in p.bgit("show", "pr/alpha:megatron/core/layers.py")


def test_stale_resolution_is_named(proj):
    p = proj
    new = conflicting_main(p)
    write_main(p, new)
    resolve_p1(p, new)
    p.ok("check-base")
    # Someone edits the original patch's message later: the resolution no longer matches.
    path = p.patch(P1)
    path.write_text(path.read_text().replace("Keep the hook to one line;", "One line;", 1))
    proc = p.fails("check-base")
    rel = f"patches/bases/{new[:12]}/{P1}"
    assert f"{rel} is stale" in proc.stderr and "make rebase-upstream" in proc.stderr
    # rebase names it too, stops at the patch and writes a fresh resolution when done.
    proc = p.fails("rebase")
    assert f"{rel} is stale" in proc.stderr and f"patches/{P1} conflicts" in proc.stderr
    wt = p.root / "build" / "rebase" / new[:12] / "Megatron-LM"
    (wt / "megatron/core/layers.py").write_text(
        LAYERS.replace(
            "    return layers\n", "    layers = alpha_hook(layers)\n    return tuple(layers)\n"
        )
    )
    git(wt, "add", "-A")
    git(wt, "am", "--continue")
    p.ok("rebase", "--continue")
    assert "One line;" in (p.root / rel).read_text()
    p.ok("check-base")


def test_new_patch_without_resolution_and_orphans(proj):
    p = proj
    new = conflicting_main(p)
    write_main(p, new)
    resolve_p1(p, new)
    # A patch that arrives later (another helper's) and conflicts on the second base.
    p.ok("apply")
    count = (p.build / "megatron/core/layers.py").read_text()
    count = count.replace("    return len(layers)\n", "    return len(list(layers))\n")
    p.commit_in_build({"megatron/core/layers.py": count}, "layers: count any iterable")
    p.ok("export")
    p3 = "0003-layers-count-any-iterable.patch"
    assert p.patch(p3).is_file()
    upstream_count = LAYERS.replace(
        "    return len(layers)\n", "    return sum(1 for _ in layers)\n"
    )
    newer = upstream_commit(
        p,
        {
            "megatron/core/layers.py": upstream_count.replace(
                "    return layers\n", "    return tuple(layers)\n"
            )
        },
        "upstream: count lazily",
    )
    # The resolutions of `new` do not carry over to `newer` by name: nothing resolves P3 there.
    proc = p.fails("check-base", "--base", newer)
    assert f"patches/{p3} conflicts on upstream {newer[:12]}" in proc.stderr
    assert "make rebase-upstream" in proc.stderr
    # On `new` itself P3 applies; deleting P1 from the series orphans its resolution.
    p.ok("check-base")
    (p.root / "patches/series").write_text(f"{P2}\n{p3}\n")
    p.patch(P1).unlink()
    proc = p.fails("check-base")
    assert f"patches/bases/{new[:12]}/{P1} resolves {P1}, which is not in patches/series" in (
        proc.stderr
    )


def test_rebase_refuses_to_drop_work_in_progress(proj):
    p = proj
    new = conflicting_main(p)
    proc = p.fails("rebase", "--base", new)
    assert f"patches/{P1} conflicts" in proc.stderr
    # Not resolved yet: continue refuses, a fresh start refuses, RESTART starts over.
    proc = p.fails("rebase", "--base", new, "--continue")
    assert "git am is still in progress" in proc.stderr
    proc = p.fails("rebase", "--base", new)
    assert "stopped at patches/" in proc.stderr and "RESTART=1" in proc.stderr
    proc = p.fails("rebase", "--base", new, "--restart")
    assert f"patches/{P1} conflicts" in proc.stderr
    # Skipping the patch (dropping its intent) is not accepted as a resolution.
    wt = p.root / "build" / "rebase" / new[:12] / "Megatron-LM"
    git(wt, "am", "--skip")
    proc = p.fails("rebase", "--base", new, "--continue")
    assert "is not the resolved commit" in proc.stderr


def test_rebase_needs_a_base(proj):
    p = proj
    proc = p.fails("rebase")
    assert "UPSTREAM_MAIN" in proc.stderr
    proc = p.fails("check-base")
    assert "UPSTREAM_MAIN" in proc.stderr


def test_rebase_unknown_commit(proj):
    p = proj
    bogus = "f" * 40
    proc = p.fails("rebase", "--base", bogus)
    assert bogus in proc.stderr and "MEGATRON_LM_GIT" in proc.stderr
    proc = p.fails("rebase", "--base", "not-a-sha")
    assert "40-hex" in proc.stderr
    write_main(p, bogus)
    proc = p.fails("check-base")
    assert bogus in proc.stderr and "MEGATRON_LM_GIT" in proc.stderr


def test_rebase_onto_commit_already_in_cache(proj):
    """The base already in the cache without a pin ref (e.g. a cache made by `git clone --bare`);
    --new is the former name of --base."""
    p = proj
    new = upstream_commit(p, {"README.md": "# v3\n"}, "upstream: v3")
    git(p.cache, "fetch", "-q", str(p.upstream), "+refs/heads/*:refs/heads/*")
    proc = p.ok("rebase", "--new", new)
    assert "0 through resolutions" in proc.stdout
    assert p.bgit("show", f"rebase/{new[:12]}:README.md") == "# v3"


def test_broken_resolution_is_named(proj):
    """A resolution committed with a syntax error (or markers) fails the check."""
    p = proj
    new = conflicting_main(p)
    write_main(p, new)
    resolve_p1(p, new)
    res = p.root / "patches" / "bases" / new[:12] / P1
    res.write_text(
        res.read_text().replace("+    layers = alpha_hook(layers)\n", "+    layers = (\n")
    )
    proc = p.fails("check-base")
    assert f"megatron/core/layers.py on {new[:12]} does not compile" in proc.stderr


def test_moving_to_a_newer_main_reuses_the_resolutions(proj):
    p = proj
    new = conflicting_main(p)
    write_main(p, new)
    resolve_p1(p, new)
    newer = upstream_commit(p, {"README.md": "# Toy upstream, later\n"}, "upstream: later")
    proc = p.ok("rebase", "--base", newer)  # no stop: the current base's resolution applies
    assert f"1 through resolutions in patches/bases/{newer[:12]}/" in proc.stdout
    assert f"set `sha = {newer}` in UPSTREAM_MAIN" in proc.stdout
    assert (p.root / "patches" / "bases" / newer[:12] / P1).is_file()
    p.ok("check-base", "--base", newer)
