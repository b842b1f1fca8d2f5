"""`pr-branch --verify` on the project's real features against the real pinned Megatron-LM.

Issue #13's done-when: the Falcon-H1 and BitNet PR branches pass upstream's checks commit by
commit, with their tests, signed off by the person running the tool. For each of the two
features this builds the PR branch from what is committed (a copy, with this checkout's
scripts/patchset.py as the tool under test) and runs the tool's own verification: every commit
imports the Python files it adds or changes, the tip passes upstream's lint rules with
upstream's pinned tool versions, the tip has no project-only strings, and (--run-tests) the
feature's own tests pass at the tip. Then it checks what verification does not:

* every commit is authored or committed and signed off by the runner (DCO), with no project
  trailers;
* falcon-h1 is reviewable alone: its branch holds no file and no patch of the CPU port
  (features cpu and torch-mamba), and its tests skip themselves rather than fail where neither
  a GPU nor the CPU port exists (here: no GPU);
* bitnet, whose tests run on CPU, stacks on the CPU port and runs its tests.

Reads the real upstream cache read-only through a private cache that borrows its objects, as
test_patchset_real_pin.py does. Skipped, with the reason, where no cache holds the pin, where
the interpreter cannot import torch (the branches' modules need it); fails without the lint
tools (`make lint-venv`, which `make test` runs first).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from patchset_testlib import (
    LINT_VENV,
    RUNNER_EMAIL,
    RUNNER_NAME,
    tool_env,
)
from project_paths import use
from real_upstream import committed_copy, pinned_cache, private_cache

use("scripts")
from upstream_lint import TOOLS  # noqa: E402

PATHS = ["patches", "megatron_overlay", "UPSTREAM", "scripts", "tests/functional_tests"]
# The CPU port: features whose files and patches the Falcon-H1 PR must not carry.
CPU_PORT = ("cpu", "torch-mamba")
RUNNER = f"{RUNNER_NAME} <{RUNNER_EMAIL}>"


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """(project copy, tool environment, pin sha); one copy for the module's tests."""
    sha, cache = pinned_cache()
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode:
        pytest.skip(f"{sys.executable} cannot import torch (run the tests with `make test`)")
    missing = [tool for tool in TOOLS if not (LINT_VENV / "bin" / tool).exists()]
    if missing:  # `make test` makes them: a check without them would prove nothing
        pytest.fail(f"no {', '.join(missing)} in {LINT_VENV}: run `make lint-venv`")

    tmp = tmp_path_factory.mktemp("real-pr")
    root = committed_copy(tmp, PATHS, must_have=("UPSTREAM", "patches/features.toml"))
    private = private_cache(tmp, cache, pin=sha)
    env = tool_env(tmp / "home", private)
    # `make test` puts the full patched tree on PYTHONPATH; a branch must not import from it.
    env.pop("PYTHONPATH", None)
    return root, env, sha


def pr_branch(committed, feature: str) -> subprocess.CompletedProcess:
    root, env, _ = committed
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "patchset.py"),
            "--root",
            str(root),
            "pr-branch",
            "--feature",
            feature,
            "--verify",
            "--run-tests",
            "--python",
            sys.executable,
            "--lint-venv",
            str(LINT_VENV),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert f"[verify] pr/{feature}: every commit imports its modules; upstream checks pass" in (
        proc.stdout
    ), output[-6000:]
    assert "[verify] upstream lint at the tip: 0 findings" in proc.stdout, output[-6000:]
    assert "[verify] pytest at the tip: " in proc.stdout, output[-6000:]
    return proc


def git(committed, *args: str) -> str:
    root, env, _ = committed
    build = root / "build" / "Megatron-LM"
    return subprocess.run(
        ["git", "-C", str(build), *args], capture_output=True, text=True, env=env, check=True
    ).stdout


def features(committed) -> dict:
    root, _, _ = committed
    return tomllib.loads((root / "patches" / "features.toml").read_text())["features"]


def subjects_of(committed, feature: str) -> set[str]:
    """Subjects of the feature's patches (the commit subjects a branch with them has)."""
    root, _, _ = committed
    found = set()
    for slug in features(committed)[feature].get("patches", []):
        (path,) = (root / "patches").glob(f"[0-9][0-9][0-9][0-9]-{slug}.patch")
        head = path.read_text().split("\n\n", 1)[0]
        subject = re.search(r"^Subject: (.*(?:\n[ \t].*)*)", head, re.M).group(1)
        found.add(re.sub(r"^\[PATCH[^\]]*\]\s*", "", re.sub(r"\n[ \t]+", " ", subject)).strip())
    return found


def overlay_of(committed, feature: str) -> set[str]:
    root, _, _ = committed
    overlay = root / "megatron_overlay"
    found = set()
    for pattern in features(committed)[feature].get("overlay", []):
        found |= {
            p.relative_to(overlay).as_posix()
            for p in overlay.glob(pattern.replace("**", "**/*"))
            if p.is_file()
        }
    return found


def check_commits(committed, feature: str) -> tuple[list[str], set[str]]:
    """(commit subjects, files) of pr/<feature>; every commit signed off by the runner."""
    _, _, sha = committed
    commits = git(committed, "rev-list", "--reverse", f"{sha}..pr/{feature}").split()
    assert commits, f"pr/{feature} has no commits"
    subjects = []
    for commit in commits:
        message = git(committed, "show", "-s", "--format=%B", commit)
        assert message.rstrip().endswith(f"Signed-off-by: {RUNNER}"), message
        assert "Upstream-Status" not in message and "Falcon-Mcore" not in message, message
        assert git(committed, "show", "-s", "--format=%cn <%ce>", commit).strip() == RUNNER
        subjects.append(git(committed, "show", "-s", "--format=%s", commit).strip())
    files = set(git(committed, "diff", "--name-only", sha, f"pr/{feature}").split())
    return subjects, files


def test_falcon_h1_pr_branch_stands_alone(committed):
    """Without the CPU port, verified per commit, its tests passing or skipping themselves."""
    proc = pr_branch(committed, "falcon-h1")
    subjects, files = check_commits(committed, "falcon-h1")
    for feature in CPU_PORT:
        assert not files & overlay_of(committed, feature), (feature, files)
        assert not set(subjects) & subjects_of(committed, feature), (feature, subjects)
    assert "megatron/core/device_utils.py" not in files
    assert not any(re.search(r"mamba2_(torch|dispatch)\.py$", f) for f in files), files
    assert not any(f.startswith("tests/functional_tests/") for f in files), files
    # Its own patches and files are all there.
    assert subjects_of(committed, "falcon-h1") <= set(subjects)
    assert "megatron/core/models/hybrid/parallel_hybrid_layer.py" in files
    # Verification hides GPUs, and the branch has no CPU port: the model tests skip themselves,
    # saying why; the others (config, layouts, FLOPs, spec resolution) run.
    assert "needs a CUDA GPU, or a tree that trains on CPU" in proc.stdout, proc.stdout[-3000:]
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-3000:]


def test_bitnet_pr_branch(committed):
    """Stacked on Falcon-H1 and the CPU port (its tests run on CPU), verified per commit."""
    proc = pr_branch(committed, "bitnet")
    subjects, files = check_commits(committed, "bitnet")
    assert subjects_of(committed, "bitnet") <= set(subjects)
    assert subjects_of(committed, "falcon-h1") <= set(subjects)
    assert "megatron/core/device_utils.py" in files
    assert any(f.startswith("tests/unit_tests/bitnet/test_") for f in files), files
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-3000:]
