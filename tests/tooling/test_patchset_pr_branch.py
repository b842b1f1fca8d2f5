"""`make pr-branch FEATURE=x`: one feature (plus what it depends on) as an upstream branch.

Every commit is committed and signed off (DCO) by the person running the tool; new files go
with the patch that first needs them, so each commit can import what it touches.
"""

from __future__ import annotations

import sys

from patchset_testlib import (
    DEV_EMAIL,
    DEV_NAME,
    OVERLAY_FILES,
    RUNNER_EMAIL,
    RUNNER_NAME,
    UPSTREAM_FILES,
)

RUNNER = f"{RUNNER_NAME} <{RUNNER_EMAIL}>"
BOT = "falcon-mcore <falcon-mcore@users.noreply.github.com>"



def add_docstring_patch(p) -> None:
    """A last patch of feature beta that only edits a docstring of an upstream file."""
    add_patch(
        p,
        {
            "megatron/core/config.py": lambda text: text.replace(
                '"""Look a default up."""', '"""Look a default up (KeyError if unknown)."""'
            )
        },
        "config: document get",
    )

def branch_files(p, branch: str) -> set[str]:
    return set(p.bgit("ls-tree", "-r", "--name-only", branch).splitlines())


def commit_files(p, rev: str) -> list[str]:
    return p.bgit("diff-tree", "--no-commit-id", "--name-only", "-r", rev).splitlines()


def test_pr_branch_with_dependency(proj):
    p = proj
    p.ok("apply")
    head_before = p.head()
    proc = p.ok("pr-branch", "--feature", "beta")
    assert "pr/beta" in proc.stdout and "stacked on: alpha" in proc.stdout
    assert f"signed off by {RUNNER}" in proc.stdout

    # alpha's patch with alpha's files, beta's patch with beta's file; nothing else.
    log = p.bgit("log", "--reverse", "--format=%s", f"{p.sha}..pr/beta").splitlines()
    assert log == ["layers: call the alpha hook", "config: add the beta flag"]
    assert commit_files(p, "pr/beta~1") == [
        "megatron/core/alpha/__init__.py",
        "megatron/core/alpha/hook.py",
        "megatron/core/layers.py",
        "tools/alpha_run.sh",
    ]
    assert commit_files(p, "pr/beta") == ["megatron/core/beta.py", "megatron/core/config.py"]
    assert branch_files(p, "pr/beta") == set(UPSTREAM_FILES) | set(OVERLAY_FILES)
    for sha in p.bgit("rev-list", f"{p.sha}..pr/beta").split():
        message = p.bgit("show", "-s", "--format=%B", sha)
        assert "Upstream-Status" not in message and "Falcon-Mcore-Overlay" not in message
        # The patch author (a person) keeps authorship and sign-off; the runner signs off last.
        assert message.rstrip().endswith(
            f"Signed-off-by: {DEV_NAME} <{DEV_EMAIL}>\nSigned-off-by: {RUNNER}"
        ), message
        assert p.bgit("show", "-s", "--format=%an <%ae>|%cn <%ce>", sha) == (
            f"{DEV_NAME} <{DEV_EMAIL}>|{RUNNER}"
        )
    message = p.bgit("show", "-s", "--format=%B", "pr/beta~1")
    assert "The alpha feature post-processes the layer list." in message
    assert "New files:\n  megatron/core/alpha/__init__.py\n" in message
    assert p.bgit("ls-tree", "pr/beta", "--", "tools/alpha_run.sh").split()[0] == "100755"

    # format-patch files for the PR, without the project's trailers.
    out = p.root / "build" / "pr" / "beta"
    files = sorted(out.glob("*.patch"))
    assert [f.name[:5] for f in files] == ["0001-", "0002-"]
    for f in files:
        text = f.read_text()
        assert "Upstream-Status" not in text and f"Signed-off-by: {RUNNER}" in text
    assert "+    layers = alpha_hook(layers)" in files[0].read_text()
    assert "megatron/core/beta.py" in files[1].read_text()

    # The build tree itself is untouched (no checkout, no new state).
    assert p.head() == head_before
    assert p.bgit("rev-parse", "--abbrev-ref", "HEAD") == "falcon-mcore"
    p.ok("guard")


def test_pr_branch_bot_patches_become_the_runners(proj):
    """A patch committed by the project's bot identity is authored and signed off by the runner
    (the bot's sign-off certifies nothing)."""
    p = proj
    for name in ("0001-layers-call-the-alpha-hook.patch",):
        patch = p.patch(name)
        patch.write_text(
            patch.read_text()
            .replace(f"From: {DEV_NAME} <{DEV_EMAIL}>", f"From: {BOT}")
            .replace(f"Signed-off-by: {DEV_NAME} <{DEV_EMAIL}>", f"Signed-off-by: {BOT}")
        )
    p.ok("pr-branch", "--feature", "alpha")
    assert p.bgit("show", "-s", "--format=%an <%ae>|%cn <%ce>", "pr/alpha") == f"{RUNNER}|{RUNNER}"
    message = p.bgit("show", "-s", "--format=%B", "pr/alpha")
    assert "falcon-mcore" not in message and message.rstrip().endswith(f"Signed-off-by: {RUNNER}")
    assert message.count("Signed-off-by:") == 1


def test_pr_branch_needs_the_runners_identity(proj):
    p = proj
    (p.tmp / "home" / ".gitconfig").write_text("[user]\n\tname = Only A Name\n")
    proc = p.fails("pr-branch", "--feature", "alpha")
    assert "user.name and user.email" in proc.stderr and "git config --global" in proc.stderr
    assert "found only Only A Name" in proc.stderr
    (p.tmp / "home" / ".gitconfig").unlink()
    proc = p.fails("pr-branch", "--feature", "alpha")
    assert "user.email" in proc.stderr
    assert not (p.root / "build/pr/alpha").exists()


def test_pr_branch_excludes_other_features(proj):
    p = proj
    p.ok("pr-branch", "--feature", "alpha")  # works without a previous apply
    log = p.bgit("log", "--format=%s", f"{p.sha}..pr/alpha").splitlines()
    assert log == ["layers: call the alpha hook"]
    files = branch_files(p, "pr/alpha")
    assert "megatron/core/beta.py" not in files and "megatron/core/alpha/hook.py" in files
    config = p.bgit("show", "pr/alpha:megatron/core/config.py") + "\n"
    assert config == UPSTREAM_FILES["megatron/core/config.py"]
    assert len(list((p.root / "build/pr/alpha").glob("*.patch"))) == 1

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
    assert log == ["layers: call the alpha hook", "gamma: add new files"]
    assert commit_files(p, "pr/gamma") == ["megatron/core/gamma.py"]
    assert "Signed-off-by: " + RUNNER in p.bgit("show", "-s", "--format=%B", "pr/gamma")

    # delta's glob matches beta.py and gamma.py too, but those belong to beta and gamma.
    p.ok("pr-branch", "--feature", "delta")
    files = branch_files(p, "pr/delta")
    assert "megatron/core/delta.py" in files
    assert not {"megatron/core/beta.py", "megatron/core/gamma.py"} & files
    # "*" stays inside one directory: alpha's files are not matched by "megatron/core/*.py".
    assert not {"megatron/core/alpha/hook.py", "megatron/core/alpha/__init__.py"} & files
    assert p.bgit("log", "--format=%s", f"{p.sha}..pr/delta") == "delta: add new files"


def add_patch(p, files: dict, subject: str) -> None:
    """Commit in the build tree (a value may be a function of the file's current text), export,
    and append the new patch to feature beta."""
    p.ok("apply")
    files = {
        rel: text((p.build / rel).read_text()) if callable(text) else text
        for rel, text in files.items()
    }
    p.commit_in_build(files, subject)
    p.ok("export")
    slug = subject.replace(": ", "-").replace(" ", "-")
    features = p.root / "patches/features.toml"
    text = features.read_text()
    beta = text.index("[features.beta]")
    start = text.index("patches = [", beta)
    end = text.index("]", start)
    features.write_text(text[:end] + f', "{slug}"' + text[end:])


def test_new_files_go_with_the_first_patch_that_imports_them(proj):
    """beta gains a patch that imports a new module (which imports another new one) and a last
    patch that names none: both modules go with the first, the rest with the last patch."""
    p = proj
    add_patch(
        p,
        {
            "megatron/core/utils.py": UPSTREAM_FILES["megatron/core/utils.py"]
            + "\n\ndef beta_scale(x):\n"
            + '    """Scale by beta."""\n'
            + "    from megatron.core.beta_ops import scale\n\n    return scale(x)\n",
            "megatron/core/beta_ops.py": "from .beta_consts import FACTOR\n\n\ndef scale(x):\n"
            "    return x * FACTOR\n",
            "megatron/core/beta_consts.py": "FACTOR = 2\n",
            "tests/unit_tests/test_beta_ops.py": "from megatron.core.beta_ops import scale\n\n\n"
            "def test_scale():\n    assert scale(2) == 4\n",
            # A script in a plain directory (loaded by path) that imports a sibling module
            # holding a dataclass (which needs its module registered in sys.modules).
            "tools/beta_tool.py": "import beta_tool_lib\n\nSPEC = beta_tool_lib.Spec(2)\n",
            "tools/beta_tool_lib.py": "from __future__ import annotations\n\n"
            "import dataclasses\n\n\n@dataclasses.dataclass\n"
            "class Spec:\n    factor: int\n",
        },
        "utils: scale by beta",
    )
    add_docstring_patch(p)  # names no new module: unnamed files go with it
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text().replace(
            'overlay = ["megatron/core/beta.py"]',
            'overlay = ["megatron/core/beta*.py", "tests/unit_tests/test_beta_ops.py", '
            '"tools/beta_tool*.py"]\n'
            'tests = ["tests-of-beta/**"]',
        )
    )
    (p.root / "tests-of-beta").mkdir()
    (p.root / "tests-of-beta/case.yaml").write_text("MODEL_ARGS: {}\n")
    p.ok("check")
    p.ok("pr-branch", "--feature", "beta")
    log = p.bgit("log", "--reverse", "--format=%s", f"{p.sha}..pr/beta").splitlines()
    assert log == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "utils: scale by beta",
        "config: document get",
    ]
    assert commit_files(p, "pr/beta~2") == ["megatron/core/config.py"]
    # The patch that imports beta_ops gets it, and beta_consts, which beta_ops imports.
    assert commit_files(p, "pr/beta~1") == [
        "megatron/core/beta_consts.py",
        "megatron/core/beta_ops.py",
        "megatron/core/utils.py",
    ]
    # beta.py (no patch names it), the unit test and the project test: the last patch.
    assert commit_files(p, "pr/beta") == [
        "megatron/core/beta.py",
        "megatron/core/config.py",
        "tests-of-beta/case.yaml",
        "tests/unit_tests/test_beta_ops.py",
        "tools/beta_tool.py",
        "tools/beta_tool_lib.py",
    ]

    # --verify imports every changed module at every commit and runs the feature's tests.
    proc = p.ok(
        "pr-branch",
        "--feature",
        "beta",
        "--verify",
        "--run-tests",
        "--python",
        sys.executable,
        "--lint-venv",
        str(p.tmp / "no-lint-tools"),
    )
    assert proc.stdout.count("[verify] ") >= 5 and "1 passed" in proc.stdout + proc.stderr
    assert "every commit imports its modules" in proc.stdout


def test_verify_finds_a_commit_that_cannot_import(proj):
    """A new module placed after the commit that imports it (here: a declared owner feature that
    comes later) breaks bisection; --verify names the commit and the module."""
    p = proj
    add_patch(
        p,
        {
            "megatron/core/utils.py": UPSTREAM_FILES["megatron/core/utils.py"]
            + "\nfrom megatron.core.late import LATE  # noqa: E402\n",
            "megatron/core/late.py": "LATE = 1\n",
        },
        "utils: use a late module",
    )
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text()
        + '\n[features.late]\ndescription = "Late."\noverlay = ["megatron/core/late.py"]\n'
        + 'depends = ["beta"]\n'
    )
    proc = p.fails(
        "pr-branch",
        "--feature",
        "late",
        "--verify",
        "--python",
        sys.executable,
        "--lint-venv",
        str(p.tmp / "no-lint-tools"),
    )
    assert "utils: use a late module" in proc.stderr
    assert "import megatron/core/utils.py: ModuleNotFoundError" in proc.stderr


def test_project_strings_are_listed(proj):
    p = proj
    add_patch(
        p,
        {
            "megatron/core/utils.py": UPSTREAM_FILES["megatron/core/utils.py"]
            + '\nHINT = "see scripts/run_falcon.sh of falcon-mcore"\n'
        },
        "utils: a hint",
    )
    proc = p.ok("pr-branch", "--feature", "beta")
    assert "[pr-branch] project-only string: megatron/core/utils.py:8:" in proc.stdout
    assert "1 lines of upstream code name this project" in proc.stdout


def test_pr_branch_on_another_base(proj):
    """BASE=<upstream commit>: the branch starts there (3-way apply); conflicts are reported
    by patch name and nothing is written."""
    p = proj
    (p.upstream / "megatron/core/newer.py").write_text('"""Upstream moved on."""\n')
    p.git(p.upstream, "add", "-A")
    p.git(p.upstream, "commit", "-q", "-m", "toy upstream: a newer commit")
    newer = p.git(p.upstream, "rev-parse", "HEAD")
    p.env["MEGATRON_LM_GIT"] = str(p.upstream)  # the cache fetches BASE from there
    p.ok("pr-branch", "--feature", "alpha", "--base", newer)
    assert p.bgit("rev-parse", "pr/alpha~1") == newer
    assert "megatron/core/newer.py" in branch_files(p, "pr/alpha")

    layers = p.upstream / "megatron/core/layers.py"
    layers.write_text(
        layers.read_text().replace("    return layers\n", "    return tuple(layers)\n")
    )
    p.git(p.upstream, "commit", "-q", "-am", "toy upstream: layers as a tuple")
    conflicting = p.git(p.upstream, "rev-parse", "HEAD")
    proc = p.fails("pr-branch", "--feature", "alpha", "--base", conflicting)
    assert "0001-layers-call-the-alpha-hook.patch" in proc.stderr
    assert f"do not apply on {conflicting[:12]}" in proc.stderr
    assert p.bgit("rev-parse", "pr/alpha~1") == newer  # the earlier branch is untouched


def test_verify_accepts_a_test_module_that_skips_itself(proj):
    """A test module that calls pytest.skip(allow_module_level=True) (GPU-only tests on a CPU
    machine) is skipped, as pytest reports it, not an import failure; a real import error in the
    same commit still fails."""
    p = proj
    skip = 'import pytest\n\npytest.skip("needs a GPU", allow_module_level=True)\n'
    add_patch(p, {"tests/unit_tests/test_gpu_only.py": skip}, "tests: a GPU-only test")
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text().replace(
            'overlay = ["megatron/core/beta.py"]',
            'overlay = ["megatron/core/beta.py", "tests/unit_tests/test_gpu_only.py"]',
        )
    )
    args = ["pr-branch", "--feature", "beta", "--verify", "--python", sys.executable]
    args += ["--lint-venv", str(p.tmp / "no-lint-tools")]
    proc = p.ok(*args)
    assert "tests/unit_tests/test_gpu_only.py: skipped itself (Skipped: needs a GPU)" in proc.stdout
    assert "every commit imports its modules" in proc.stdout

    broken = skip.replace("import pytest\n", "import pytest\nimport no_such_module  # noqa\n")
    add_patch(p, {"tests/unit_tests/test_gpu_only.py": broken}, "tests: break it")
    proc = p.fails(*args)
    assert "import tests/unit_tests/test_gpu_only.py: ModuleNotFoundError" in proc.stderr


def test_a_relative_import_in_a_patch_places_the_new_module(proj):
    """A patch that adds ``from .beta_rel import helper`` to an upstream file gets the new
    module beta_rel.py in its own commit (not the feature's last), so that commit imports."""
    p = proj
    add_patch(
        p,
        {
            "megatron/core/utils.py": UPSTREAM_FILES["megatron/core/utils.py"]
            + "\nfrom .beta_rel import helper  # noqa: E402\n",
            "megatron/core/beta_rel.py": "def helper():\n    return 1\n",
        },
        "utils: use the beta helper",
    )
    add_docstring_patch(p)
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text().replace(
            'overlay = ["megatron/core/beta.py"]', 'overlay = ["megatron/core/beta*.py"]'
        )
    )
    p.ok("check")
    p.ok("pr-branch", "--feature", "beta")
    assert p.bgit("log", "-1", "--format=%s", "pr/beta~1") == "utils: use the beta helper"
    assert commit_files(p, "pr/beta~1") == ["megatron/core/beta_rel.py", "megatron/core/utils.py"]
    assert "megatron/core/beta_rel.py" not in commit_files(p, "pr/beta")
