"""Helpers and toy data of the patch-set tooling tests (``scripts/patchset.py``).

A module of its own (not ``conftest``) so that ``from patchset_testlib import ...`` cannot pick
up another directory's ``conftest.py``; ``conftest.py`` here puts this directory on sys.path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "patchset.py"
# Modules that patchset.py imports from its own directory (copied next to it).
SCRIPT_MODULES = [REPO_ROOT / "scripts" / "upstream_lint.py"]
LINT_VENV = REPO_ROOT / ".venv-lint"

DEV_NAME = "Test Dev"
DEV_EMAIL = "dev@example.com"
DEV_DATE = "2024-03-04T05:06:07+00:00"
# The person who runs `pr-branch` (their ~/.gitconfig in the tool's private HOME).
RUNNER_NAME = "Pat Runner"
RUNNER_EMAIL = "pat@example.com"

# Upstream files of the toy "Megatron-LM". Long enough that hunks have real context.
UPSTREAM_FILES = {
    "README.md": "# Toy upstream\n\nStands in for Megatron-LM in the tooling tests.\n",
    "megatron/__init__.py": "",
    "megatron/core/__init__.py": '"""Toy megatron.core."""\n',
    "megatron/core/layers.py": (
        '"""Layers of the toy upstream."""\n'
        "\n"
        "\n"
        "def build_layers(config):\n"
        '    """Build the layer list."""\n'
        "    layers = []\n"
        "    for index in range(config.num_layers):\n"
        "        layers.append(make_layer(index))\n"
        "    return layers\n"
        "\n"
        "\n"
        "def make_layer(index):\n"
        '    """One layer."""\n'
        '    return {"index": index}\n'
        "\n"
        "\n"
        "def count_layers(layers):\n"
        '    """Number of layers."""\n'
        "    return len(layers)\n"
    ),
    "megatron/core/config.py": (
        '"""Configuration of the toy upstream."""\n'
        "\n"
        "DEFAULTS = {\n"
        '    "num_layers": 2,\n'
        '    "hidden_size": 8,\n'
        '    "vocab_size": 16,\n'
        "}\n"
        "\n"
        "\n"
        "def get(key):\n"
        '    """Look a default up."""\n'
        "    return DEFAULTS[key]\n"
    ),
    "megatron/core/utils.py": (
        '"""Utilities of the toy upstream."""\n'
        "\n"
        "\n"
        "def identity(x):\n"
        '    """Return x."""\n'
        "    return x\n"
    ),
}

# The project's two patches: (file, old text, new text, subject, body, Upstream-Status).
PATCHES = [
    (
        "megatron/core/layers.py",
        "        layers.append(make_layer(index))\n    return layers\n",
        "        layers.append(make_layer(index))\n"
        "    layers = alpha_hook(layers)\n"
        "    return layers\n",
        "layers: call the alpha hook",
        "The alpha feature post-processes the layer list. Keep the hook to one line;\n"
        "the logic lives in megatron/core/alpha/.",
        "Pending",
    ),
    (
        "megatron/core/config.py",
        '    "vocab_size": 16,\n}\n',
        '    "vocab_size": 16,\n    "beta_flag": False,\n}\n',
        "config: add the beta flag",
        "Beta needs a switch that defaults to off, so existing configurations are\n" "unchanged.",
        "Not-for-upstream",
    ),
]
PATCH_NAMES = [
    "0001-layers-call-the-alpha-hook.patch",
    "0002-config-add-the-beta-flag.patch",
]

OVERLAY_FILES = {
    "megatron/core/alpha/__init__.py": '"""Alpha feature."""\n',
    "megatron/core/alpha/hook.py": (
        '"""The alpha hook."""\n\n\ndef alpha_hook(layers):\n    """Reverse."""\n'
        "    return list(reversed(layers))\n"
    ),
    "megatron/core/beta.py": '"""Beta feature."""\n\nBETA = True\n',
    "tools/alpha_run.sh": "#!/bin/sh\necho alpha\n",
}
EXECUTABLE_OVERLAY = {"tools/alpha_run.sh"}

FEATURES_TOML = """\
# Toy features of the tooling tests.

[features.alpha]
description = "The alpha hook."
patches = ["layers-call-the-alpha-hook"]
overlay = ["megatron/core/alpha/**", "tools/alpha_*.sh"]

[features.beta]
description = "The beta flag."
patches = ["config-add-the-beta-flag"]
overlay = ["megatron/core/beta.py"]
depends = ["alpha"]
"""

# The same deterministic format-patch options that DESIGN.md section 2 asks for.
FORMAT_PATCH = [
    "format-patch",
    "--zero-commit",
    "--no-signature",
    "--no-numbered",
    "--full-index",
    "--no-renames",
    "--no-cover-letter",
    "--no-thread",
    "--no-attach",
    "--no-signoff",
    "--filename-max-length=64",
]


def git_env(date: str = DEV_DATE) -> dict[str, str]:
    """Environment for git commands run by the tests: no user config, fixed identity/date."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_AUTHOR_NAME=DEV_NAME,
        GIT_AUTHOR_EMAIL=DEV_EMAIL,
        GIT_COMMITTER_NAME=DEV_NAME,
        GIT_COMMITTER_EMAIL=DEV_EMAIL,
        GIT_AUTHOR_DATE=date,
        GIT_COMMITTER_DATE=date,
        LC_ALL="C",
    )
    return env


def git(repo: Path, *args: str, input: str | None = None, date: str = DEV_DATE) -> str:
    """Run git in ``repo``; fail the test with git's stderr if it fails; return stdout."""
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input,
        capture_output=True,
        text=True,
        env=git_env(date),
    )
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed in {repo}:\n{proc.stderr}")
    return proc.stdout.strip()


def commit_message(subject: str, body: str, status: str | None = "Pending") -> str:
    """A commit message in the project's patch style (body, Upstream-Status, DCO)."""
    trailers = (f"Upstream-Status: {status}\n" if status else "") + (
        f"Signed-off-by: {DEV_NAME} <{DEV_EMAIL}>\n"
    )
    return f"{subject}\n\n{body}\n\n{trailers}"


def write_files(root: Path, files: dict[str, str], executable: set[str] = frozenset()) -> None:
    """Write ``files`` (relative path -> text) below ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if rel in executable else 0o644)


def tree_snapshot(root: Path) -> dict[str, tuple[bytes, bool]]:
    """{relative path: (content, executable)} of every file below ``root``."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), os.access(p, os.X_OK))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Templates:
    """Session-wide originals that each test copies."""

    upstream: Path
    sha: str
    project: Path
    cache: Path


def build_templates(base: Path) -> Templates:
    """Build the toy upstream repo, the toy project and a filled cache under ``base``."""
    upstream = base / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    write_files(upstream, UPSTREAM_FILES)
    git(upstream, "add", "-A")
    git(upstream, "commit", "-q", "-m", "toy upstream: initial import")
    git(upstream, "tag", "v1.0")
    sha = git(upstream, "rev-parse", "HEAD")

    # Patches: commits in a scratch clone, rendered with format-patch (not with the tool).
    scratch = base / "scratch"
    git(base, "clone", "-q", str(upstream), str(scratch))
    for i, (rel, old, new, subject, body, status) in enumerate(PATCHES):
        path = scratch / rel
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
        git(
            scratch,
            "commit",
            "-q",
            "-a",
            "-F",
            "-",
            input=commit_message(subject, body, status),
            date=f"2024-03-0{i + 4}T05:06:07+00:00",
        )
    project = base / "project"
    patches = project / "patches"
    patches.mkdir(parents=True)
    git(scratch, *FORMAT_PATCH, f"--base={sha}", "-o", str(patches), f"{sha}..HEAD")
    assert sorted(p.name for p in patches.glob("*.patch")) == PATCH_NAMES
    (patches / "series").write_text("".join(f"{n}\n" for n in PATCH_NAMES))
    (patches / "features.toml").write_text(FEATURES_TOML)
    write_files(project / "megatron_overlay", OVERLAY_FILES, EXECUTABLE_OVERLAY)
    (project / "scripts").mkdir()
    shutil.copy2(SCRIPT, project / "scripts" / "patchset.py")
    for module in SCRIPT_MODULES:
        shutil.copy2(module, project / "scripts" / module.name)

    # A cache filled by the tool itself (test_upstream checks this path in detail).
    cache = base / "cache"
    env = tool_env(base / "home", cache)
    env["MEGATRON_LM_GIT"] = str(upstream)
    write_pin(project, str(upstream), sha)
    proc = subprocess.run(
        [
            sys.executable,
            str(project / "scripts" / "patchset.py"),
            "--root",
            str(project),
            "upstream",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return Templates(upstream=upstream, sha=sha, project=project, cache=cache)


def tool_env(home: Path, cache: Path) -> dict[str, str]:
    """Environment of the tool: private HOME and cache, no MEGATRON_LM_GIT, no git overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_") and k not in ("MEGATRON_LM_GIT", "FALCON_MCORE_CACHE")
    }
    home.mkdir(parents=True, exist_ok=True)
    if not (home / ".gitconfig").exists():
        (home / ".gitconfig").write_text(
            f"[user]\n\tname = {RUNNER_NAME}\n\temail = {RUNNER_EMAIL}\n"
        )
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        FALCON_MCORE_CACHE=str(cache),
        LC_ALL="C",
    )
    return env


def write_pin(project: Path, url: str, sha: str, tag: str = "v1.0") -> None:
    """Write the project's ``UPSTREAM`` file."""
    (project / "UPSTREAM").write_text(
        f"# Toy pin for the tooling tests.\nurl = {url}\ntag = {tag}\nsha = {sha}\n"
    )


class Proj:
    """One test's throwaway world: upstream repo, project root, cache, build tree."""

    def __init__(self, tmp: Path, templates: Templates, *, empty_cache: bool = False):
        self.tmp = tmp
        self.sha = templates.sha
        self.upstream = tmp / "upstream"
        self.root = tmp / "project"
        self.cache = tmp / "cache"
        self.build = self.root / "build" / "Megatron-LM"
        shutil.copytree(templates.upstream, self.upstream, symlinks=True)
        shutil.copytree(templates.project, self.root, symlinks=True)
        if not empty_cache:
            shutil.copytree(templates.cache, self.cache, symlinks=True)
        write_pin(self.root, str(self.upstream), self.sha)
        self.env = tool_env(tmp / "home", self.cache)

    # -- running the tool ------------------------------------------------------------------
    def run(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``scripts/patchset.py --root <project> ARGS`` and return the finished process."""
        full_env = dict(self.env)
        full_env.update(env or {})
        return subprocess.run(
            [
                sys.executable,
                str(self.root / "scripts" / "patchset.py"),
                "--root",
                str(self.root),
                *args,
            ],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=cwd or self.tmp,
            timeout=120,
        )

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run the tool and assert exit status 0."""
        proc = self.run(*args, **kwargs)
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def fails(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run the tool and assert exit status 2 with an ``error:`` message, no traceback."""
        proc = self.run(*args, **kwargs)
        assert proc.returncode == 2, f"{args}: expected exit 2, got {proc.returncode}:\n" + (
            proc.stdout + proc.stderr
        )
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        return proc

    # -- git and files ---------------------------------------------------------------------
    git = staticmethod(git)

    def bgit(self, *args: str, **kwargs) -> str:
        """git in the build tree."""
        return git(self.build, *args, **kwargs)

    def commit_in_build(
        self,
        files: dict[str, str | None],
        subject: str,
        body: str = "Because tests need it.",
        status: str | None = "Pending",
        date: str = DEV_DATE,
        executable: set[str] = frozenset(),
    ) -> str:
        """Write (or delete, for None) ``files`` in the build tree and commit them; return sha."""
        for rel, text in files.items():
            path = self.build / rel
            if text is None:
                git(self.build, "rm", "-q", "--", rel)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755 if rel in executable else 0o644)
            git(self.build, "add", "--", rel)
        git(
            self.build,
            "commit",
            "-q",
            "-F",
            "-",
            input=commit_message(subject, body, status),
            date=date,
        )
        return git(self.build, "rev-parse", "HEAD")

    def patch(self, name: str) -> Path:
        """Path of ``patches/<name>``."""
        return self.root / "patches" / name

    def managed_snapshot(self) -> dict[str, dict[str, tuple[bytes, bool]]]:
        """Contents of patches/ and megatron_overlay/ (what export writes)."""
        return {
            "patches": tree_snapshot(self.root / "patches"),
            "overlay": tree_snapshot(self.root / "megatron_overlay"),
        }

    def head(self) -> str:
        """HEAD of the build tree."""
        return git(self.build, "rev-parse", "HEAD")

    def tree(self, rev: str = "HEAD") -> str:
        """Tree hash of ``rev`` in the build tree."""
        return git(self.build, "rev-parse", f"{rev}^{{tree}}")
