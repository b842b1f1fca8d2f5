"""`make pr-branch FEATURE=x`: one feature (plus what it depends on) as an upstream branch."""

from __future__ import annotations

from patchset_testlib import DEV_EMAIL, DEV_NAME, OVERLAY_FILES, UPSTREAM_FILES


def branch_files(p, branch: str) -> set[str]:
    return set(p.bgit("ls-tree", "-r", "--name-only", branch).splitlines())


def test_pr_branch_with_dependency(proj):
    p = proj
    p.ok("apply")
    head_before = p.head()
    proc = p.ok("pr-branch", "--feature", "beta")
    assert "pr/beta" in proc.stdout and "stacked on: alpha" in proc.stdout

    # alpha's patch + beta's patch, then the two overlay commits; nothing else.
    log = p.bgit("log", "--reverse", "--format=%s", f"{p.sha}..pr/beta").splitlines()
    assert log == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "alpha: add new files",
        "beta: add new files",
    ]
    assert branch_files(p, "pr/beta") == set(UPSTREAM_FILES) | set(OVERLAY_FILES)
    for sha in p.bgit("rev-list", f"{p.sha}..pr/beta").split():
        message = p.bgit("show", "-s", "--format=%B", sha)
        assert "Upstream-Status" not in message
        assert "Falcon-Mcore-Overlay" not in message
        assert "Signed-off-by: " in message
    message = p.bgit("show", "-s", "--format=%B", "pr/beta~3")
    assert f"Signed-off-by: {DEV_NAME} <{DEV_EMAIL}>" in message
    assert "The alpha feature post-processes the layer list." in message
    assert p.bgit("ls-tree", "pr/beta", "--", "tools/alpha_run.sh").split()[0] == "100755"

    # format-patch files for the PR, without the project's trailers.
    out = p.root / "build" / "pr" / "beta"
    files = sorted(out.glob("*.patch"))
    assert [f.name[:5] for f in files] == ["0001-", "0002-", "0003-", "0004-"]
    for f in files:
        text = f.read_text()
        assert "Upstream-Status" not in text and "Signed-off-by: " in text
    assert "+    layers = alpha_hook(layers)" in files[0].read_text()
    assert "megatron/core/beta.py" in files[3].read_text()

    # The build tree itself is untouched (no checkout, no new state).
    assert p.head() == head_before
    assert p.bgit("rev-parse", "--abbrev-ref", "HEAD") == "falcon-mcore"
    p.ok("guard")


def test_pr_branch_excludes_other_features(proj):
    p = proj
    p.ok("pr-branch", "--feature", "alpha")  # works without a previous apply
    log = p.bgit("log", "--format=%s", f"{p.sha}..pr/alpha").splitlines()
    assert log == ["alpha: add new files", "layers: call the alpha hook"]
    files = branch_files(p, "pr/alpha")
    assert "megatron/core/beta.py" not in files and "megatron/core/alpha/hook.py" in files
    config = p.bgit("show", "pr/alpha:megatron/core/config.py") + "\n"
    assert config == UPSTREAM_FILES["megatron/core/config.py"]
    assert len(list((p.root / "build/pr/alpha").glob("*.patch"))) == 2

    # Re-running replaces the branch and the output directory.
    (p.root / "build/pr/alpha/stale.patch").write_text("old\n")
    first = p.bgit("rev-parse", "pr/alpha")
    p.ok("pr-branch", "--feature", "alpha")
    assert p.bgit("rev-parse", "pr/alpha") == first
    assert not (p.root / "build/pr/alpha/stale.patch").exists()


def test_pr_branch_unknown_feature(proj):
    proc = proj.fails("pr-branch", "--feature", "nope")
    assert "FEATURE=nope is not declared in patches/features.toml" in proc.stderr
    assert "alpha" in proc.stderr and "beta" in proc.stderr  # the known ones are listed


def test_pr_branch_overlay_follows_apply_ownership(proj):
    """Overlapping globs: a file belongs to the first matching feature, as in apply."""
    p = proj
    features = p.root / "patches" / "features.toml"
    features.write_text(
        features.read_text()
        + '\n[features.gamma]\ndescription = "Gamma."\n'
        + 'overlay = ["megatron/core/alpha/**", "megatron/core/gamma.py"]\ndepends = ["alpha"]\n'
        + '\n[features.delta]\ndescription = "Delta."\noverlay = ["megatron/core/*.py"]\n'
    )
    (p.root / "megatron_overlay/megatron/core/gamma.py").write_text("GAMMA = 1\n")
    (p.root / "megatron_overlay/megatron/core/delta.py").write_text("DELTA = 1\n")
    p.ok("check")

    # gamma's glob also matches alpha's files; they stay in alpha's commit, once.
    p.ok("pr-branch", "--feature", "gamma")
    log = p.bgit("log", "--reverse", "--format=%s", f"{p.sha}..pr/gamma").splitlines()
    assert log == ["layers: call the alpha hook", "alpha: add new files", "gamma: add new files"]
    gamma_files = p.bgit("diff-tree", "--no-commit-id", "--name-only", "-r", "pr/gamma")
    assert gamma_files == "megatron/core/gamma.py"

    # delta's glob matches beta.py and gamma.py too, but those belong to beta and gamma.
    p.ok("pr-branch", "--feature", "delta")
    files = branch_files(p, "pr/delta")
    assert "megatron/core/delta.py" in files
    assert not {"megatron/core/beta.py", "megatron/core/gamma.py"} & files
    # "*" stays inside one directory: alpha's files are not matched by "megatron/core/*.py".
    assert not {"megatron/core/alpha/hook.py", "megatron/core/alpha/__init__.py"} & files
    assert p.bgit("log", "--format=%s", f"{p.sha}..pr/delta") == "delta: add new files"
