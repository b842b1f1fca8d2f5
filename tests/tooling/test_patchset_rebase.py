"""`make rebase-upstream NEW=<sha>`: re-apply the series on another upstream commit."""

from __future__ import annotations

import re

from patchset_testlib import UPSTREAM_FILES, git

P1 = "0001-layers-call-the-alpha-hook.patch"
P2 = "0002-config-add-the-beta-flag.patch"


def upstream_commit(p, files: dict[str, str], message: str) -> str:
    """Add a commit to the toy upstream repository (on its main branch); return its sha."""
    for rel, text in files.items():
        path = p.upstream / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(p.upstream, "add", "-A")
    git(p.upstream, "commit", "-q", "-m", message, date="2024-06-01T00:00:00+00:00")
    return git(p.upstream, "rev-parse", "HEAD")


def test_rebase_conflict_names_the_patch(proj):
    p = proj
    p.ok("apply")
    head = p.head()
    layers = UPSTREAM_FILES["megatron/core/layers.py"].replace(
        "        layers.append(make_layer(index))\n    return layers\n",
        "        layers.append(make_layer(index))\n    return tuple(layers)\n",
    )
    new = upstream_commit(p, {"megatron/core/layers.py": layers}, "upstream: return a tuple")
    before = p.managed_snapshot()

    proc = p.fails("rebase", "--new", new)
    out = proc.stdout
    assert f"CONFLICT {P1}" in out
    assert f"CONFLICT {P2}" not in out
    assert "1 patch(es) conflict (3-way merge failed):" in out
    assert "range-diff old..new:" in out
    range_diff = out.split("range-diff old..new:")[1]
    # The conflicting patch is missing on the new side ("<"), the others are paired.
    assert re.search(r"^1: +[0-9a-f]+ < +-: +-+ layers: call the alpha hook$", range_diff, re.M)
    assert re.search(
        r"^2: +[0-9a-f]+ = +1: +[0-9a-f]+ config: add the beta flag$", range_diff, re.M
    )
    assert f"1 patch(es) conflict on {new[:12]}" in proc.stderr
    report = p.root / "build" / "rebase" / new[:12] / "report.txt"
    assert f"CONFLICT {P1}" in report.read_text()
    # The non-conflicting patch was still carried over onto the new base.
    branch = f"rebase/{new[:12]}"
    log = p.bgit("log", "--format=%s", f"{new}..{branch}").splitlines()
    assert "config: add the beta flag" in log and "layers: call the alpha hook" not in log
    # Nothing in the project or the build tree moved.
    assert p.managed_snapshot() == before
    assert p.head() == head
    p.ok("guard")


def test_rebase_clean(proj):
    p = proj
    # A change that moves the patched lines (3-way / offset needed) and one elsewhere.
    layers = UPSTREAM_FILES["megatron/core/layers.py"].replace(
        '"""Layers of the toy upstream."""\n',
        '"""Layers of the toy upstream."""\n\nimport os\n\nDEBUG = os.environ.get("DEBUG")\n',
    )
    new = upstream_commit(
        p,
        {"README.md": "# Toy upstream, v2\n", "megatron/core/layers.py": layers},
        "upstream: v2",
    )
    proc = p.ok("rebase", "--new", new)
    assert "all patches apply" in proc.stdout
    assert "range-diff old..new:" in proc.stdout
    branch = f"rebase/{new[:12]}"
    assert p.bgit("rev-parse", "--verify", "-q", f"{branch}-old") != ""
    log = p.bgit("log", "--reverse", "--format=%s", f"{new}..{branch}").splitlines()
    assert log == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "alpha: add falcon-mcore overlay files",
        "beta: add falcon-mcore overlay files",
    ]
    text = p.bgit("show", f"{branch}:megatron/core/layers.py")
    assert "DEBUG = os.environ" in text and "layers = alpha_hook(layers)" in text
    assert p.bgit("show", f"{branch}:README.md") == "# Toy upstream, v2"
    assert p.bgit("show", f"{branch}:megatron/core/beta.py").startswith('"""Beta feature."""')
    # The range-diff pairs every patch as unchanged or changed, none dropped.
    range_diff = proc.stdout.split("range-diff old..new:")[1]
    for i, subject in enumerate(log, 1):
        assert re.search(rf"^{i}: +[0-9a-f]+ = +{i}: +[0-9a-f]+ {subject}$", range_diff, re.M)


def test_rebase_unknown_commit(proj):
    p = proj
    bogus = "f" * 40
    proc = p.fails("rebase", "--new", bogus)
    assert bogus in proc.stderr and "MEGATRON_LM_GIT" in proc.stderr
    proc = p.fails("rebase", "--new", "not-a-sha")
    assert "40-hex" in proc.stderr


def test_rebase_onto_commit_already_in_cache(proj):
    """NEW already in the cache without a pin ref (e.g. a cache made by `git clone --bare`)."""
    p = proj
    new = upstream_commit(p, {"README.md": "# v3\n"}, "upstream: v3")
    git(p.cache, "fetch", "-q", str(p.upstream), "+refs/heads/*:refs/heads/*")
    proc = p.ok("rebase", "--new", new)
    assert "all patches apply" in proc.stdout
    assert p.bgit("show", f"rebase/{new[:12]}:README.md") == "# v3"
