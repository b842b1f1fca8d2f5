#!/usr/bin/env python3
"""falcon-mcore patch-set tool: pinned upstream, apply / export / check / PR branches / rebase.

The project is a patch series (``patches/``) plus new files (``megatron_overlay/``) on top of a
pinned upstream Megatron-LM commit (``UPSTREAM``). This tool is what the Makefile targets call.

Model of the build tree (``build/Megatron-LM``, a normal git checkout):

* branch ``falcon-mcore`` = pin + one commit per patch (``git am``, zero fuzz) + one commit per
  feature holding that feature's overlay files (trailer ``Falcon-Mcore-Overlay: <feature>``).
* Commits are made with a fixed committer identity and ``--committer-date-is-author-date``, so
  applying the same inputs twice gives the same commit and tree hashes.
* Export classifies every path: a file that does not exist in the pinned upstream tree (or that a
  feature declares under ``replaces``) is an *overlay* file and is synced to ``megatron_overlay/``;
  every other change becomes part of a patch. Patches therefore only edit upstream files.
* ``.git/falcon-mcore-state.json`` in the build tree records the HEAD that the last apply/export
  produced and a digest of the inputs. Apply refuses to run over commits or edits that were not
  exported; export refuses to overwrite ``patches/`` when they changed since the last apply.

Only the Python standard library is used (Python >= 3.11).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream_lint  # noqa: E402  (a module of this directory)

BRANCH = "falcon-mcore"
STATE_FILE = "falcon-mcore-state.json"
OVERLAY_TRAILER = "Falcon-Mcore-Overlay"
TOOL_IDENTITY = ("falcon-mcore", "falcon-mcore@users.noreply.github.com")
UPSTREAM_STATUS_RE = re.compile(
    r"^Upstream-Status: (Pending|Not-for-upstream|Submitted \S+|Accepted \S+|Backport \S+)\s*$",
    re.M,
)
# Deterministic format-patch output whatever the user's git configuration says.
FORMAT_PATCH_ARGS = [
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


class PatchsetError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------------------------
# git helpers


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for git: no user/system config, fixed identity, C locale."""
    env = dict(os.environ)
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": TOOL_IDENTITY[0],
            "GIT_AUTHOR_EMAIL": TOOL_IDENTITY[1],
            "GIT_COMMITTER_NAME": TOOL_IDENTITY[0],
            "GIT_COMMITTER_EMAIL": TOOL_IDENTITY[1],
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
        }
    )
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(key, None)
    if extra:
        env.update(extra)
    return env


def git(
    repo: Path | str,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess:
    """Run git in ``repo`` and return the completed process (stdout as bytes)."""
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input,
        capture_output=True,
        env=git_env(env),
    )
    if check and proc.returncode != 0:
        # Some failures (e.g. "nothing to commit") are reported on stdout only.
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise PatchsetError(
            f"git {' '.join(args)} failed in {repo}:\n" + detail.decode(errors="replace")
        )
    return proc


def git_out(repo: Path | str, *args: str, **kwargs) -> str:
    """Run git and return stripped stdout as text."""
    return git(repo, *args, **kwargs).stdout.decode().strip()


def has_commit(repo: Path, sha: str) -> bool:
    """True when ``repo`` contains commit ``sha``."""
    return git(repo, "cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode == 0


# --------------------------------------------------------------------------------------------
# project description


@dataclass
class Pin:
    """The pinned upstream commit (``UPSTREAM`` file)."""

    url: str
    tag: str
    sha: str

    @classmethod
    def load(cls, path: Path) -> "Pin":
        """Parse ``key = value`` lines; ``#`` starts a comment."""
        if not path.is_file():
            raise PatchsetError(f"{path}: missing (it must hold url, tag and sha of upstream)")
        values: dict[str, str] = {}
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise PatchsetError(f"{path}:{lineno}: expected 'key = value', got {raw!r}")
            key, value = (part.strip() for part in line.split("=", 1))
            values[key] = value
        missing = [k for k in ("url", "tag", "sha") if not values.get(k)]
        if missing:
            raise PatchsetError(f"{path}: missing {', '.join(missing)}")
        if not re.fullmatch(r"[0-9a-f]{40}", values["sha"]):
            raise PatchsetError(f"{path}: sha must be a full 40-hex commit id, got {values['sha']}")
        return cls(values["url"], values["tag"], values["sha"])


@dataclass
class Feature:
    """A named group of patches and overlay paths that can become one upstream PR."""

    name: str
    description: str = ""
    patches: list[str] = field(default_factory=list)  # patch slugs (file name w/o NNNN- .patch)
    overlay: list[str] = field(default_factory=list)  # glob patterns, relative to the tree
    replaces: list[str] = field(default_factory=list)  # upstream files an overlay file replaces
    depends: list[str] = field(default_factory=list)
    # Project test files (globs relative to the project root, e.g. functional test cases under
    # tests/functional_tests/) that a PR branch of the feature carries at the same path.
    tests: list[str] = field(default_factory=list)

    def owns_overlay(self, path: str) -> bool:
        """True when ``path`` matches one of the feature's overlay patterns."""
        return any(_glob_match(path, pattern) for pattern in self.overlay)


def _glob_match(path: str, pattern: str) -> bool:
    """Glob on ``/``-separated paths: ``*``, ``?``, ``[..]`` stay within one path component;
    a ``**`` component matches any number of components (``dir/**`` = everything below ``dir``).
    """
    return _match_parts(path.split("/"), pattern.split("/"))


def _match_parts(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        if len(pats) == 1:
            return len(parts) >= 1
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])
    )


def patch_slug(filename: str) -> str:
    """``0003-hybrid-add-P.patch`` -> ``hybrid-add-P``."""
    return re.sub(r"^\d{4}-", "", filename.removesuffix(".patch"))


@dataclass
class Project:
    """A falcon-mcore checkout: pin, series, features, overlay, build tree."""

    root: Path
    build: Path

    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    @property
    def overlay_dir(self) -> Path:
        return self.root / "megatron_overlay"

    @property
    def pin(self) -> Pin:
        return Pin.load(self.root / "UPSTREAM")

    def series(self) -> list[str]:
        """Patch file names listed in ``patches/series``, in order."""
        path = self.patches_dir / "series"
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
        return entries

    def features(self) -> list[Feature]:
        """Features from ``patches/features.toml`` in file order."""
        path = self.patches_dir / "features.toml"
        if not path.is_file():
            return []
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise PatchsetError(f"{path}: {exc}") from exc
        features = []
        for name, body in data.get("features", {}).items():
            unknown = set(body) - {
                "description",
                "patches",
                "overlay",
                "replaces",
                "depends",
                "tests",
            }
            if unknown:
                raise PatchsetError(f"{path}: feature {name}: unknown keys {sorted(unknown)}")
            features.append(Feature(name=name, **body))
        return features

    def overlay_files(self) -> list[str]:
        """Overlay file paths relative to ``megatron_overlay/``, sorted."""
        if not self.overlay_dir.is_dir():
            return []
        files = []
        for path in self.overlay_dir.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(path.relative_to(self.overlay_dir).as_posix())
        return sorted(files)

    def managed_digest(self) -> str:
        """Digest of what export writes: patches/series, patches/*.patch, megatron_overlay/."""
        h = hashlib.sha256()
        series = self.patches_dir / "series"
        patch_files = sorted(self.patches_dir.glob("*.patch")) if self.patches_dir.is_dir() else []
        for path in ([series] if series.is_file() else []) + patch_files:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        for rel in self.overlay_files():
            path = self.overlay_dir / rel
            mode = b"x" if os.access(path, os.X_OK) else b"-"
            h.update(rel.encode() + b"\0" + mode + path.read_bytes() + b"\0")
        return h.hexdigest()

    def patches_digest(self) -> str:
        """Digest of patches/series and patches/*.patch."""
        h = hashlib.sha256()
        series = self.patches_dir / "series"
        patch_files = sorted(self.patches_dir.glob("*.patch")) if self.patches_dir.is_dir() else []
        for path in ([series] if series.is_file() else []) + patch_files:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()

    def overlay_hashes(self) -> dict[str, str]:
        """{overlay path: hash of mode + content} for every overlay file."""
        return {
            rel: blob_hash(
                (self.overlay_dir / rel).read_bytes(), os.access(self.overlay_dir / rel, os.X_OK)
            )
            for rel in self.overlay_files()
        }

    def inputs_digest(self) -> str:
        """Digest of everything apply reads: the managed files, the pin and the features."""
        h = hashlib.sha256(self.managed_digest().encode())
        for path in (self.root / "UPSTREAM", self.patches_dir / "features.toml"):
            h.update(path.read_bytes() if path.is_file() else b"")
        return h.hexdigest()


def blob_hash(data: bytes, executable: bool) -> str:
    """Hash of a file's content and executable bit (for three-way overlay sync)."""
    return hashlib.sha256((b"x" if executable else b"-") + data).hexdigest()


def cache_dir() -> Path:
    """Bare cache of upstream, shared by every checkout of the project on this machine."""
    if os.environ.get("FALCON_MCORE_CACHE"):
        return Path(os.environ["FALCON_MCORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "falcon-mcore" / "Megatron-LM.git"


# --------------------------------------------------------------------------------------------
# upstream cache


def source_location(source: str) -> str:
    """An existing local path made absolute (git runs in the cache, not in the caller's cwd)."""
    local = os.path.expanduser(source)
    if "://" not in source and os.path.exists(local):
        return os.path.abspath(local)
    return source


def ensure_commit_in_cache(sha: str, pin: Pin, *, what: str = "pinned upstream commit") -> Path:
    """Make sure the bare cache holds ``sha``; fetch it from ``MEGATRON_LM_GIT`` if needed."""
    cache = cache_dir()
    ref = f"refs/falcon-mcore/pins/{sha}"
    if cache.is_dir() and has_commit(cache, sha):
        # A cache seeded some other way (``git clone --bare``, or a commit that arrived with
        # another fetch) lacks the pin ref that build trees fetch: create it (only then, so a
        # cache that is already complete is only read).
        current = git(cache, "rev-parse", "-q", "--verify", ref, check=False).stdout.strip()
        if current.decode() != sha:
            git(cache, "update-ref", ref, sha)
        return cache
    source = source_location(os.environ.get("MEGATRON_LM_GIT") or pin.url)
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
        git(tmp, "init", "-q", "--bare")
        os.replace(tmp, cache) if not cache.exists() else shutil.rmtree(tmp)
    print(f"[upstream] fetching {sha[:12]} from {source} into {cache}", flush=True)
    attempts = [
        ["fetch", "-q", "--no-tags", source, f"{sha}:{ref}"],
        ["fetch", "-q", "--no-tags", source, f"+refs/tags/{pin.tag}:refs/tags/{pin.tag}"],
        ["fetch", "-q", "--no-tags", source, "+refs/heads/*:refs/remotes/source/*"],
    ]
    errors = []
    for args in attempts:
        proc = git(cache, *args, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            # git's first "fatal:"/"error:" line says what went wrong; the last is boilerplate.
            reason = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), None)
            reason = reason or (lines[-1] if lines else "")
            if reason and reason not in errors:
                errors.append(reason)
        if has_commit(cache, sha):
            git(cache, "update-ref", ref, sha)
            return cache
    detail = "; ".join(errors)
    raise PatchsetError(
        f"{what} {sha} is not available from {source}"
        + (f" ({detail})" if detail else "")
        + ".\nSet MEGATRON_LM_GIT to a git URL or a local Megatron-LM repository that contains "
        f"{sha}, e.g.\n  MEGATRON_LM_GIT=/path/to/Megatron-LM make upstream"
    )


def cmd_upstream(project: Project, args: argparse.Namespace) -> None:
    pin = project.pin
    cache = ensure_commit_in_cache(pin.sha, pin)
    print(f"[upstream] {pin.tag} = {pin.sha} available in {cache}")
    main = MainBase.load(project.root)
    if main is not None:
        # The second base is only needed by check-base / rebase: a failure is not fatal here.
        try:
            source = Pin(main.url, pin.tag, main.sha)
            ensure_commit_in_cache(main.sha, source, what=f"second base ({MAIN_BASE_FILE})")
        except PatchsetError as exc:
            print(f"[upstream] warning: {exc}", file=sys.stderr)
        else:
            print(f"[upstream] {main.branch} = {main.sha} ({MAIN_BASE_FILE}) available in {cache}")


# --------------------------------------------------------------------------------------------
# build tree


def read_state(build: Path) -> dict | None:
    path = build / ".git" / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_state(
    build: Path,
    project: Project,
    head: str,
    *,
    complete: bool = True,
    tree_overlay: dict[str, str] | None = None,
) -> None:
    """Record the HEAD that apply/export produced and digests of the project's inputs.

    ``overlay`` is the base of the next export's three-way overlay merge: the overlay files as
    the build tree holds them (after apply they equal megatron_overlay/).
    """
    state = {
        "head": head,
        "pin": project.pin.sha,
        "inputs": project.inputs_digest() if complete else "",
        "managed": project.managed_digest() if complete else "",
        "patches": project.patches_digest() if complete else "",
        "overlay": (
            (tree_overlay if tree_overlay is not None else project.overlay_hashes())
            if complete
            else {}
        ),
    }
    atomic_write(build / ".git" / STATE_FILE, json.dumps(state, indent=1).encode())


def atomic_write(path: Path, data: bytes, executable: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def uncommitted_changes(build: Path) -> list[str]:
    out = git(build, "status", "--porcelain", "--untracked-files=all").stdout.decode()
    return [line for line in out.splitlines() if line.strip()]


def guard_build_tree(project: Project, *, discard: bool) -> None:
    """Refuse to touch a build tree that holds work not yet exported."""
    build = project.build
    if not (build / ".git").exists():
        if build.exists() and any(build.iterdir()):
            raise PatchsetError(f"{build} exists but is not a git checkout; move it away first")
        return
    changes = uncommitted_changes(build)
    if changes:
        shown = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
        raise PatchsetError(
            f"{build} has uncommitted changes:\n  {shown}\n"
            "Nothing was changed. To keep them: commit them in that tree and run "
            "`make export-patches`.\nTo drop them: `git -C "
            f"{build} stash -u` (recoverable) and run `make apply-patches` again."
        )
    head_proc = git(build, "rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
    if head_proc.returncode != 0:
        # Unborn branch: pr-branch/rebase created the repository before any apply. No commits
        # and (checked above) no files, so there is nothing to lose.
        return
    head = head_proc.stdout.decode().strip()
    state = read_state(build)
    if state is None or state.get("head") != head:
        if not discard:
            raise PatchsetError(
                f"{build} has commits that were not exported (HEAD {head[:12]}"
                + (f", last applied/exported {state['head'][:12]}" if state else "")
                + ").\nNothing was changed. To keep them: `make export-patches`. To set them "
                "aside and rebuild from patches/: `make apply-patches DISCARD=1` (saves "
                "them under refs/falcon-mcore/backup/)."
            )
        ref = f"refs/falcon-mcore/backup/{time.strftime('%Y%m%d-%H%M%S')}-{head[:12]}"
        # "" as the old value: never overwrite an existing backup (same second, same HEAD).
        if git(build, "update-ref", ref, head, "", check=False).returncode != 0:
            print(f"[apply] HEAD {head[:12]} is already saved as {ref}")
            return
        print(f"[apply] saved unexported HEAD {head[:12]} as {ref}")


def init_checkout(build: Path, sha: str) -> None:
    """Create ``build`` as a git checkout containing ``sha`` (fetched from the cache)."""
    cache = cache_dir()
    if not (build / ".git").exists():
        build.mkdir(parents=True, exist_ok=True)
        git(build, "init", "-q")
        git(build, "config", "core.autocrlf", "false")
    if not has_commit(build, sha):
        git(build, "fetch", "-q", "--no-tags", str(cache), f"refs/falcon-mcore/pins/{sha}")
    git(build, "update-ref", "refs/falcon-mcore/pin", sha)


def commit_env(date: str) -> dict[str, str]:
    return {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}


def apply_series(
    project: Project, tree: Path, base: str, *, three_way: bool = False, strip_status: bool = False
) -> list[tuple[str, str]]:
    """``git am`` every series patch onto ``tree`` (checked out at ``base``).

    Returns a list of (patch, error) for patches that failed (only with ``three_way``, where the
    caller wants a conflict report); otherwise the first failure raises.
    """
    failures = []
    for name in project.series():
        path = project.patches_dir / name
        if not path.is_file():
            raise PatchsetError(f"patches/series lists {name}, but patches/{name} does not exist")
        data = path.read_bytes()
        if strip_status:
            data = re.sub(rb"(?m)^Upstream-Status: .*\n", b"", data)
        am = ["am", "-q", "--committer-date-is-author-date", "--keep-cr"]
        am.append("--3way" if three_way else "--no-3way")
        proc = git(tree, *am, input=data, check=False)
        if proc.returncode != 0:
            message = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            git(tree, "am", "--abort", check=False)
            if three_way:
                failures.append((name, message))
                continue
            raise PatchsetError(
                f"patches/{name} does not apply on {base[:12]} (zero fuzz):\n{message}"
            )
    return failures


def overlay_assignment(project: Project) -> dict[str, list[str]]:
    """Map feature name -> overlay files it owns (first matching feature wins)."""
    features = project.features()
    owned: dict[str, list[str]] = {f.name: [] for f in features}
    owned["unassigned"] = []
    for rel in project.overlay_files():
        owner = next((f.name for f in features if f.owns_overlay(rel)), "unassigned")
        owned[owner].append(rel)
    return owned


def commit_overlay(
    project: Project, tree: Path, feature: str, files: list[str], base: str, date: str
) -> None:
    """Copy overlay ``files`` into ``tree`` and commit them as the feature's overlay commit."""
    if not files:
        return
    declared = {p for f in project.features() for p in f.replaces}
    upstream = set(ls_tree(tree, base))
    clobber = sorted(set(files) & upstream - declared)
    if clobber:
        raise PatchsetError(
            "overlay files would replace upstream files without being declared: "
            + ", ".join(clobber)
            + "\nDeclare them under `replaces` of their feature in patches/features.toml, "
            "or make the change a patch."
        )
    for rel in files:
        src = project.overlay_dir / rel
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755 if os.access(src, os.X_OK) else 0o644)
    git(tree, "add", "-f", "--", *files)
    if not staged_changes(tree):
        return  # only declared replacements identical to upstream: nothing to commit
    message = (
        f"{feature}: add falcon-mcore overlay files\n\n"
        f"New files of the {feature} feature, copied from megatron_overlay/.\n\n"
        f"{OVERLAY_TRAILER}: {feature}\n"
    )
    git(
        tree, "commit", "-q", "--no-verify", "-F", "-", input=message.encode(), env=commit_env(date)
    )


def staged_changes(tree: Path) -> bool:
    """True when the index of ``tree`` differs from HEAD."""
    return git(tree, "diff", "--cached", "--quiet", check=False).returncode != 0


def ls_tree(repo: Path, rev: str) -> list[str]:
    out = git(repo, "ls-tree", "-r", "-z", "--name-only", rev).stdout.decode()
    return [p for p in out.split("\0") if p]


def build_tree_at(project: Project, tree: Path, base: str, *, strip_status: bool = False) -> str:
    """Reset ``tree`` to ``base``, apply series + overlay; return the resulting HEAD."""
    git(tree, "checkout", "-q", "-f", "-B", BRANCH, base)
    git(tree, "clean", "-q", "-fd")
    apply_series(project, tree, base, strip_status=strip_status)
    date = git_out(tree, "show", "-s", "--format=%cI", base)
    for feature, files in overlay_assignment(project).items():
        commit_overlay(project, tree, feature, files, base, date)
    return git_out(tree, "rev-parse", "HEAD")


def cmd_guard(project: Project, args: argparse.Namespace) -> None:
    guard_build_tree(project, discard=False)
    print(f"[guard] {project.build}: no unexported work")


def cmd_apply(project: Project, args: argparse.Namespace) -> None:
    pin = project.pin
    ensure_commit_in_cache(pin.sha, pin)
    build = project.build
    guard_build_tree(project, discard=args.discard)
    digest = project.inputs_digest()
    state = read_state(build) if (build / ".git").exists() else None
    if state and state.get("inputs") == digest and not args.discard:
        print(f"[apply] {build} is up to date ({state['head'][:12]})")
        return
    init_checkout(build, pin.sha)
    try:
        head = build_tree_at(project, build, pin.sha)
    except PatchsetError:
        # Everything in the tree came from patches/ and megatron_overlay/: nothing is lost.
        write_state(build, project, git_out(build, "rev-parse", "HEAD"), complete=False)
        raise
    write_state(build, project, head)
    count = int(git_out(build, "rev-list", "--count", f"{pin.sha}..HEAD"))
    tree_hash = git_out(build, "rev-parse", "HEAD^{tree}")
    print(f"[apply] {build}: {count} commits on {pin.sha[:12]}, tree {tree_hash}")


# --------------------------------------------------------------------------------------------
# export


def overlay_paths(project: Project, tree: Path, base: str, rev: str = "HEAD") -> set[str]:
    """Paths at ``rev`` that belong to the overlay: new files and declared replacements."""
    upstream = set(ls_tree(tree, base))
    declared = {p for f in project.features() for p in f.replaces}
    return {p for p in ls_tree(tree, rev) if p not in upstream or p in declared}


def linearise_patches(project: Project, tree: Path, base: str, overlay: set[str]) -> str:
    """Re-create base..HEAD as commits that touch only non-overlay paths; return the tip."""
    commits = git_out(tree, "rev-list", "--reverse", "--topo-order", f"{base}..HEAD").split()
    merges = git_out(tree, "rev-list", "--merges", f"{base}..HEAD").split()
    if merges:
        raise PatchsetError(f"merge commits above the pin cannot be exported: {merges[0][:12]}")
    upstream = set(ls_tree(tree, base))
    tip = base
    with tempfile.TemporaryDirectory() as tmp:
        index_env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        for commit in commits:
            changed = git(
                tree, "diff-tree", "-r", "-z", "--no-renames", "--name-only", f"{commit}^", commit
            ).stdout.decode()
            paths = [p for p in changed.split("\0") if p and p not in overlay]
            # A file deleted again after being added is neither upstream nor overlay: skip it.
            paths = [p for p in paths if p in upstream]
            if not paths:
                continue
            diff = git(
                tree,
                "diff-tree",
                "-p",
                "--binary",
                "--full-index",
                "--no-renames",
                f"{commit}^",
                commit,
                "--",
                *paths,
            ).stdout
            git(tree, "read-tree", tip, env=index_env)
            git(tree, "apply", "--cached", "-", input=diff, env=index_env)
            new_tree = git_out(tree, "write-tree", env=index_env)
            fields = git_out(tree, "show", "-s", "--format=%an%x00%ae%x00%ad", "--date=raw", commit)
            name, email, date = fields.split("\0")
            message = git(tree, "show", "-s", "--format=%B", commit).stdout
            env = {
                "GIT_AUTHOR_NAME": name,
                "GIT_AUTHOR_EMAIL": email,
                "GIT_AUTHOR_DATE": date,
                "GIT_COMMITTER_DATE": date,
            }
            tip = git_out(
                tree, "commit-tree", new_tree, "-p", tip, "-F", "-", input=message, env=env
            )
    return tip


def render_patches(tree: Path, base: str, tip: str) -> dict[str, bytes]:
    """format-patch base..tip deterministically; return {file name: content}."""
    if tip == base:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        git(tree, *FORMAT_PATCH_ARGS, f"--base={base}", "-o", tmp, f"{base}..{tip}")
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}


def export_to(
    project: Project,
    tree: Path,
    base: str,
    patches_out: Path,
    overlay_out: Path,
    overlay_base: dict[str, str] | None = None,
) -> tuple[bool, dict[str, str]]:
    """Write the tree's patches and overlay files into the given directories.

    Returns (whether anything changed, {overlay path: blob_hash} of the tree's overlay). Only files managed by this tool are touched:
    ``*.patch`` and ``series`` in ``patches_out`` and every file in ``overlay_out``.

    ``overlay_base`` ({path: blob_hash}) is the overlay as of the last apply/export. With it,
    overlay files merge three ways: a file changed only in the tree is written, a file changed
    only in ``overlay_out`` (edited there since) is kept, and a file changed on both sides is a
    conflict (nothing is written). Without it the tree wins (scratch exports of `check`).
    """
    overlay = overlay_paths(project, tree, base)
    tree_files: dict[str, tuple[bytes, bool]] = {}
    for rel in sorted(overlay):
        blob = git(tree, "cat-file", "blob", f"HEAD:{rel}").stdout
        mode = git_out(tree, "ls-tree", "HEAD", "--", rel).split()[0]
        tree_files[rel] = (blob, mode == "100755")
    project_files: dict[str, tuple[bytes, bool]] = {}
    if overlay_out.is_dir():
        for path in overlay_out.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(overlay_out).as_posix()
                project_files[rel] = (path.read_bytes(), os.access(path, os.X_OK))
    writes: dict[str, tuple[bytes, bool]] = {}
    deletes: list[str] = []
    conflicts: list[str] = []
    for rel in sorted(set(tree_files) | set(project_files)):
        t, p = tree_files.get(rel), project_files.get(rel)
        t_hash = blob_hash(*t) if t else None
        p_hash = blob_hash(*p) if p else None
        if t_hash == p_hash:
            continue
        if overlay_base is not None:
            b_hash = overlay_base.get(rel)
            if t_hash == b_hash:
                continue  # changed only in megatron_overlay/: keep it
            if p_hash != b_hash:
                conflicts.append(rel)
                continue
        if t is None:
            deletes.append(rel)
        else:
            writes[rel] = t
    if conflicts:
        raise PatchsetError(
            "these overlay files changed both in megatron_overlay/ and in the build tree since "
            "the last apply/export:\n  " + "\n  ".join(conflicts) + "\nNothing was written. "
            "Make the two versions agree (e.g. copy your megatron_overlay/ edit into the build "
            "tree and commit it), then export again."
        )
    tip = linearise_patches(project, tree, base, overlay)
    patches = render_patches(tree, base, tip)
    series = "".join(f"{name}\n" for name in patches).encode()
    changed = False
    patches_out.mkdir(parents=True, exist_ok=True)
    for name, data in patches.items():
        target = patches_out / name
        if not target.is_file() or target.read_bytes() != data:
            atomic_write(target, data)
            changed = True
    for stale in patches_out.glob("*.patch"):
        if stale.name not in patches:
            stale.unlink()
            changed = True
    series_path = patches_out / "series"
    if not series_path.is_file() or series_path.read_bytes() != series:
        atomic_write(series_path, series)
        changed = True
    for rel, (blob, executable) in writes.items():
        atomic_write(overlay_out / rel, blob, executable=executable)
        changed = True
    for rel in deletes:
        (overlay_out / rel).unlink()
        changed = True
    if overlay_out.is_dir():
        for path in sorted(overlay_out.rglob("*"), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return changed, {rel: blob_hash(*value) for rel, value in tree_files.items()}


def cmd_export(project: Project, args: argparse.Namespace) -> None:
    build = project.build
    pin = project.pin
    if not (build / ".git").exists():
        raise PatchsetError(f"{build} does not exist: run `make apply-patches` first")
    changes = uncommitted_changes(build)
    if changes:
        raise PatchsetError(
            f"{build} has uncommitted changes; commit them first (export reads commits only):\n  "
            + "\n  ".join(changes[:20])
        )
    state = read_state(build)
    if state is None or state.get("pin") != pin.sha:
        raise PatchsetError(f"{build} was not made by `make apply-patches` for pin {pin.sha[:12]}")
    if not state.get("managed") and not args.force:
        # write_state(complete=False): the last apply stopped at a patch that did not apply.
        # HEAD lacks that patch, the ones after it and the overlay; exporting would delete them.
        raise PatchsetError(
            f"the last `make apply-patches` did not finish ({build} holds only part of the "
            "series and no overlay files); exporting now would delete the rest from patches/ "
            "and megatron_overlay/.\nFix the patch it reported and run `make apply-patches` "
            "again, or pass FORCE=1 to let the build tree win."
        )
    if "patches" not in state and state.get("managed"):
        # State written by an older version of this tool: no per-file overlay base.
        stale = state["managed"] != project.managed_digest()
    else:
        stale = state.get("patches") != project.patches_digest()
    if state.get("managed") and stale and not args.force:
        raise PatchsetError(
            "patches/ changed since the last `make apply-patches`; exporting now would "
            "overwrite those changes.\nRun `make apply-patches` first (it refuses if the build "
            "tree has unexported commits), or pass FORCE=1 to let the build tree win."
        )
    overlay_base = None if args.force else state.get("overlay")
    changed, tree_overlay = export_to(
        project, build, pin.sha, project.patches_dir, project.overlay_dir, overlay_base
    )
    write_state(build, project, git_out(build, "rev-parse", "HEAD"), tree_overlay=tree_overlay)
    print("[export] patches/ and megatron_overlay/ " + ("updated" if changed else "unchanged"))
    for problem in lint(project):
        print(f"[export] warning: {problem}")


# --------------------------------------------------------------------------------------------
# check


def patch_header_problems(name: str, data: bytes) -> list[str]:
    """Problems with one patch file's mail header and message."""
    text = data.decode(errors="replace")
    head, sep, _ = text.partition("\n---\n")
    if not sep:
        return [f"{name}: no '---' separator between message and diff"]
    problems = []
    subject = re.search(r"^Subject: (.+)$", head, re.M)
    if not subject or not subject.group(1).replace("[PATCH]", "").strip():
        problems.append(f"{name}: no Subject")
    header_end = head.find("\n\n")
    body = head[header_end + 2 :] if header_end >= 0 else ""
    # Trailers are the last paragraph when every line of it looks like "Key: value"; a prose
    # line such as "Note: ..." elsewhere in the body is still prose.
    paragraphs = [p for p in re.split(r"\n\s*\n", body.strip()) if p.strip()]
    if paragraphs and all(
        re.match(r"^[A-Za-z0-9-]+: ", line) for line in paragraphs[-1].splitlines()
    ):
        paragraphs.pop()
    if not paragraphs:
        problems.append(f"{name}: no body saying why (only a subject and trailers)")
    if not UPSTREAM_STATUS_RE.search(body):
        problems.append(
            f"{name}: no valid 'Upstream-Status:' trailer "
            "(Pending | Submitted <url> | Not-for-upstream)"
        )
    if not re.search(r"^Signed-off-by: .+ <.+@.+>$", body, re.M):
        problems.append(f"{name}: no 'Signed-off-by: Name <email>' trailer (DCO)")
    return problems


def lint(project: Project) -> list[str]:
    """Static checks of patches/, features.toml and megatron_overlay/."""
    problems = []
    series = project.series()
    listed = set(series)
    if len(listed) != len(series):
        problems.append("patches/series lists a patch twice")
    for name in series:
        path = project.patches_dir / name
        if not path.is_file():
            problems.append(f"patches/series lists {name}, which does not exist")
        else:
            problems.extend(patch_header_problems(name, path.read_bytes()))
    if project.patches_dir.is_dir():
        for path in sorted(project.patches_dir.glob("*.patch")):
            if path.name not in listed:
                problems.append(f"patches/{path.name} is not listed in patches/series")
    features = project.features()
    names = [f.name for f in features]
    slugs = {patch_slug(n): n for n in series}
    claimed: dict[str, str] = {}
    for feature in features:
        for dep in feature.depends:
            if dep not in names or names.index(dep) >= names.index(feature.name):
                problems.append(f"feature {feature.name}: depends on {dep}, not an earlier feature")
        for slug in feature.patches:
            if slug not in slugs:
                problems.append(f"feature {feature.name}: patch '{slug}' is not in patches/series")
            elif slug in claimed:
                problems.append(f"patch '{slug}' is in features {claimed[slug]} and {feature.name}")
            else:
                claimed[slug] = feature.name
    for slug, name in slugs.items():
        if slug not in claimed:
            problems.append(f"patches/{name} belongs to no feature in patches/features.toml")
    order = [claimed.get(patch_slug(n)) for n in series]
    seen: list[str] = []
    for feature_name in order:
        if feature_name and feature_name in seen and seen[-1] != feature_name:
            problems.append(f"patches of feature {feature_name} are not contiguous in the series")
        if feature_name and (not seen or seen[-1] != feature_name):
            seen.append(feature_name)
    for feature in features:
        for pattern in feature.tests:
            if not project_test_files(project, Feature(feature.name, tests=[pattern])):
                problems.append(f"feature {feature.name}: tests glob '{pattern}' matches no file")
    unassigned = overlay_assignment(project)["unassigned"]
    for rel in unassigned:
        problems.append(f"megatron_overlay/{rel} belongs to no feature in patches/features.toml")
    return problems


def scratch_tree(pin: Pin, where: Path) -> Path:
    tree = where / "Megatron-LM"
    init_checkout(tree, pin.sha)
    return tree


def compare_dirs(expected: Path, actual: Path, label: str, patches_only: bool = False) -> list[str]:
    """Byte-for-byte comparison of the files under two directories."""

    def files(root: Path) -> dict[str, bytes]:
        if not root.is_dir():
            return {}
        out = {}
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if not p.is_file() or "__pycache__" in p.parts:
                continue
            # patches/bases/ (resolutions for another upstream base) is not export's output.
            if patches_only and ("/" in rel or not (rel == "series" or rel.endswith(".patch"))):
                continue
            out[rel] = p.read_bytes()
        return out

    a, b = files(expected), files(actual)
    problems = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            problems.append(f"round trip: {label}/{rel} is not reproduced by export")
        elif rel not in a:
            problems.append(f"round trip: export produces {label}/{rel}, which is not committed")
        elif a[rel] != b[rel]:
            problems.append(f"round trip: {label}/{rel} differs after apply -> export")
    return problems


def series_changes(tree: Path, base: str, rev: str = "HEAD") -> dict[str, str | None]:
    """{path: text at ``base``, or None for a new file} of the files ``base..rev`` adds or
    changes (deleted files are left out: there is nothing to lint)."""
    out = git(tree, "diff", "--name-status", "-z", "--no-renames", base, rev).stdout.decode()
    fields = [f for f in out.split("\0") if f]
    changes: dict[str, str | None] = {}
    for status, rel in zip(fields[::2], fields[1::2]):
        if status == "A":
            changes[rel] = None
        elif status == "M":
            blob = git(tree, "cat-file", "blob", f"{base}:{rel}").stdout
            try:
                changes[rel] = blob.decode()
            except UnicodeDecodeError:
                continue  # binary: not linted
    return changes


def lint_venv(args: argparse.Namespace, project: Project) -> Path:
    venv = Path(args.lint_venv) if args.lint_venv else project.root / ".venv-lint"
    return venv if venv.is_absolute() else project.root / venv


def run_upstream_lint(project: Project, tree: Path, base: str, venv: Path) -> list[str]:
    """Findings of upstream's lint rules on the series in ``tree``, printed; returns them."""
    changes = series_changes(tree, base)
    changes = {
        rel: pin for rel, pin in changes.items() if (tree / rel).is_file() and _is_text(tree / rel)
    }
    try:
        findings, notes = upstream_lint.lint_files(
            venv, tree, changes, project.root / "build" / "lint-cache.json"
        )
    except upstream_lint.LintError as exc:
        raise PatchsetError(str(exc)) from exc
    counts: dict[str, set[str]] = {}
    for finding in findings:
        counts.setdefault(finding.tool, set()).add(finding.path)
        print(f"[lint] {finding}")
    for rel in notes:
        print(
            f"[lint] note: {rel}: the pinned black/isort would also change upstream's own lines "
            "(not counted; upstream CI checks whole files under megatron/core and tests/)"
        )
    per_tool = ", ".join(
        f"{tool} {sum(f.tool == tool for f in findings)} in {len(paths)} files"
        for tool, paths in sorted(counts.items())
    )
    print(
        f"[lint] {len(findings)} findings on {len(changes)} files the series adds or changes"
        + (f" ({per_tool})" if findings else "")
    )
    return [str(f) for f in findings]


def _is_text(path: Path) -> bool:
    try:
        path.read_text()
    except UnicodeDecodeError:
        return False
    return True


def cmd_check(project: Project, args: argparse.Namespace) -> None:
    problems = lint(project)
    lint_problems: list[str] = []
    pin = project.pin
    ensure_commit_in_cache(pin.sha, pin)
    if args.lint != "off":
        check_lint_tools(lint_venv(args, project))
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-check.") as tmp:
        tmp_path = Path(tmp)
        tree = scratch_tree(pin, tmp_path)
        try:
            build_tree_at(project, tree, pin.sha)
        except PatchsetError as exc:
            problems.append(str(exc))
        else:
            out_patches = tmp_path / "patches"
            out_overlay = tmp_path / "overlay"
            export_to(project, tree, pin.sha, out_patches, out_overlay)
            problems += compare_dirs(project.patches_dir, out_patches, "patches", patches_only=True)
            problems += compare_dirs(project.overlay_dir, out_overlay, "megatron_overlay")
            if args.lint != "off":
                lint_problems = run_upstream_lint(project, tree, pin.sha, lint_venv(args, project))
    if lint_problems and args.lint == "strict":
        problems.append(
            f"{len(lint_problems)} findings of upstream's lint rules (listed above with [lint]); "
            "`make format` fixes black/isort/header findings"
        )
    if problems:
        raise PatchsetError("check-patches found problems:\n  " + "\n  ".join(problems))
    lint_note = {
        "off": "",
        "report": f"; upstream lint: {len(lint_problems)} findings (LINT=report: not failing)",
        "strict": "; upstream lint: no findings",
    }[args.lint]
    print(
        f"[check] OK: {len(project.series())} patches, {len(project.overlay_files())} overlay "
        f"files; zero-fuzz apply on {pin.sha[:12]} and byte-identical round trip{lint_note}"
    )


def check_lint_tools(venv: Path) -> None:
    for tool in upstream_lint.TOOLS:
        try:
            upstream_lint.tool_path(venv, tool)
        except upstream_lint.LintError as exc:
            raise PatchsetError(str(exc)) from exc


def cmd_format(project: Project, args: argparse.Namespace) -> None:
    """Format what the series adds or changes with upstream's black + isort (and headers).

    New files are formatted whole; changed upstream files only in the formatter hunks that
    touch the series' lines, so upstream's own lines stay as they are. Every commit of the build
    tree is rewritten (each commit's files formatted as they are at that commit, so no patch
    conflicts with a reformatted earlier one), then exported to patches/ and megatron_overlay/.
    """
    venv = lint_venv(args, project)
    check_lint_tools(venv)
    pin = project.pin
    cmd_apply(project, argparse.Namespace(discard=False))  # refuses on unexported work
    build = project.build
    commits = git_out(build, "rev-list", "--reverse", f"{pin.sha}..HEAD").split()
    done: dict[tuple[str, str], str] = {}  # (path, blob) -> formatted text
    parent = pin.sha
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-format.") as tmp:
        with with_worktree(build, Path(tmp) / "wt", pin.sha) as wt:
            for commit in commits:
                git(wt, "checkout", "-q", "-f", "--detach", commit)
                changes = {
                    rel: pin_text
                    for rel, pin_text in series_changes(build, pin.sha, commit).items()
                    if rel.endswith(".py") and _is_text(wt / rel)
                }
                blobs = {rel: git_out(build, "rev-parse", f"{commit}:{rel}") for rel in changes}
                todo = {
                    rel: (changes[rel], (wt / rel).read_text())
                    for rel in changes
                    if (rel, blobs[rel]) not in done
                }
                formatted, failures = upstream_lint.format_files(venv, wt, todo)
                if failures:
                    raise PatchsetError(
                        "nothing was changed: the formatter cannot parse these files at "
                        f"commit {commit[:12]}:\n  " + "\n  ".join(str(f) for f in failures)
                    )
                for rel, text in formatted.items():
                    done[(rel, blobs[rel])] = text
                for rel in changes:
                    (wt / rel).write_text(done[(rel, blobs[rel])])
                if changes:
                    git(wt, "add", "--", *changes)
                tree = git_out(wt, "write-tree")
                fields = git_out(
                    build,
                    "show",
                    "-s",
                    "--format=%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd",
                    "--date=raw",
                    commit,
                ).split("\0")
                env = dict(
                    zip(
                        [
                            "GIT_AUTHOR_NAME",
                            "GIT_AUTHOR_EMAIL",
                            "GIT_AUTHOR_DATE",
                            "GIT_COMMITTER_NAME",
                            "GIT_COMMITTER_EMAIL",
                            "GIT_COMMITTER_DATE",
                        ],
                        fields,
                    )
                )
                message = git(build, "show", "-s", "--format=%B", commit).stdout
                parent = git_out(
                    build, "commit-tree", tree, "-p", parent, "-F", "-", input=message, env=env
                )
    if git_out(build, "rev-parse", f"{parent}^{{tree}}") == git_out(
        build, "rev-parse", "HEAD^{tree}"
    ):
        print("[format] nothing to format: the series already follows upstream's formatting")
        return
    git(build, "reset", "-q", "--hard", parent)
    cmd_export(project, argparse.Namespace(force=False))
    print("[format] formatted; review with `git diff` and commit patches/ and megatron_overlay/")


# --------------------------------------------------------------------------------------------
# pr-branch and rebase


def feature_closure(project: Project, name: str) -> list[Feature]:
    """The feature and everything it depends on, in series order."""
    by_name = {f.name: f for f in project.features()}
    if name not in by_name:
        raise PatchsetError(
            f"FEATURE={name} is not declared in patches/features.toml; known: {', '.join(by_name)}"
        )
    wanted: set[str] = set()

    def visit(n: str) -> None:
        if n in wanted:
            return
        wanted.add(n)
        for dep in by_name[n].depends:
            if dep not in by_name:
                raise PatchsetError(f"feature {n} depends on unknown feature {dep}")
            visit(dep)

    visit(name)
    return [f for f in project.features() if f.name in wanted]


class _SubsetProject(Project):
    """A view of the project restricted to some features (for PR branches)."""

    def __init__(self, base: Project, features: list[Feature]):
        super().__init__(base.root, base.build)
        self._features = features
        slugs = {s for f in features for s in f.patches}
        self._series = [n for n in base.series() if patch_slug(n) in slugs]

    def series(self) -> list[str]:
        return self._series

    def features(self) -> list[Feature]:
        return self._features


def with_worktree(repo: Path, where: Path, rev: str):
    """Context manager: a detached worktree of ``repo`` at ``rev``, removed afterwards."""

    class _Worktree:
        def __enter__(self) -> Path:
            git(repo, "worktree", "add", "-q", "--detach", str(where), rev)
            return where

        def __exit__(self, *exc) -> None:
            git(repo, "worktree", "remove", "--force", str(where), check=False)
            git(repo, "worktree", "prune", check=False)

    return _Worktree()


def runner_identity(project: Project) -> tuple[str, str]:
    """Name and email of the person running the tool, from their own git configuration."""

    def config(key: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}
        proc = subprocess.run(
            ["git", "-C", str(project.root), "config", "--get", key],
            capture_output=True,
            text=True,
            env=env,
        )
        return proc.stdout.strip()

    name = os.environ.get("GIT_AUTHOR_NAME") or config("user.name")
    email = os.environ.get("GIT_AUTHOR_EMAIL") or config("user.email")
    if not name or not email or (name, email) == TOOL_IDENTITY:
        raise PatchsetError(
            "a PR branch is authored and signed off (DCO) by you, but git has no identity of "
            "yours (git config keys user.name and user.email"
            + (f"; found only {name or email}" if name or email else "")
            + "). Set them, e.g.\n  git config --global user.name 'Your Name'\n"
            "  git config --global user.email you@example.com"
        )
    return name, email


_DOTTED_RE = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT_RE = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+\(?([\w\s,]+)", re.M)


def module_name(rel: str) -> str | None:
    """Dotted module of a ``.py`` path (``a/b/__init__.py`` -> ``a.b``), else None."""
    if not rel.endswith(".py"):
        return None
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts else None


def referenced_names(text: str) -> set[str]:
    """Dotted names a text mentions, with ``from a import b`` also giving ``a.b``."""
    names = set(_DOTTED_RE.findall(text))
    for base, imported in _FROM_IMPORT_RE.findall(text):
        for name in re.split(r"[\s,]+", imported):
            if name and name != "as":
                names.add(f"{base}.{name}")
    return names


_RELATIVE_IMPORT_RE = re.compile(r"^\s*from\s+(\.+)([\w.]*)\s+import\s+\(?([\w\s,]+)", re.M)


def patch_added_names(text: str) -> set[str]:
    """Dotted names that the added lines of a patch mention, without comments; a relative import
    (``from .mod import x`` added to ``a/b/c.py``) is resolved against the file it is added to
    (``a.b.mod``, ``a.b.mod.x``)."""
    added: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("+++ "):
            current = line[6:] if line.startswith("+++ b/") else ""
        elif line.startswith("+"):
            added.setdefault(current, []).append(line[1:].split("#", 1)[0])
    names: set[str] = set()
    for rel, lines in added.items():
        code = "\n".join(lines)
        names |= referenced_names(code)
        module = module_name(rel) or ""
        package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
        for dots, base, imported in _RELATIVE_IMPORT_RE.findall(code):
            parts = package.split(".") if package else []
            parts = parts[: len(parts) - (len(dots) - 1)] if len(dots) > 1 else parts
            full = ".".join(parts + ([base] if base else []))
            names.add(full)
            names.update(f"{full}.{n}" for n in re.split(r"[\s,]+", imported) if n and n != "as")
    return names


def python_imports(rel: str, text: str) -> set[str]:
    """Modules a Python file imports (relative imports resolved; ``from a import b`` also gives
    ``a.b``). Names in comments and strings do not count."""
    module = module_name(rel) or ""
    package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return referenced_names(text)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def mentions(names: set[str], module: str) -> bool:
    return any(n == module or n.startswith(module + ".") for n in names)


@dataclass
class PrStep:
    """One commit of a PR branch: a patch (with the new files it needs) or a feature's files."""

    feature: Feature
    patch: str | None  # patches/ file name; None for a feature without patches
    files: list[str] = field(default_factory=list)  # paths in the tree


def project_test_files(project: Project, feature: Feature) -> list[str]:
    """Project files (paths relative to the root) matched by the feature's ``tests`` globs."""
    found = set()
    for pattern in feature.tests:
        parts = pattern.split("/")
        fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        start = project.root.joinpath(*parts[: len(parts) if fixed is None else fixed])
        candidates = [start] if start.is_file() else start.rglob("*") if start.is_dir() else []
        for path in candidates:
            rel = path.relative_to(project.root).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and _glob_match(rel, pattern):
                found.add(rel)
    return sorted(found)


def pr_plan(project: Project, features: list[Feature]) -> tuple[list[PrStep], list[str]]:
    """The commits of a PR branch and warnings.

    Every new file goes with the first patch of its feature whose added lines import or name
    its module; a file that no patch names goes with the feature's last patch (tests, tools,
    modules only other new files import). A file that another new file imports is moved to
    that file's commit or earlier, so every commit of the branch can import what it touches.
    Features without patches get one commit of their own.
    """
    series = _SubsetProject(project, features).series()
    by_slug = {patch_slug(n): n for n in series}
    owned = overlay_assignment(project)
    steps: list[PrStep] = []
    feature_steps: dict[str, list[int]] = {}
    for feature in features:
        names = [by_slug[s] for s in feature.patches if s in by_slug]
        for name in names or [None]:
            feature_steps.setdefault(feature.name, []).append(len(steps))
            steps.append(PrStep(feature, name))
    ordered = [st.patch for st in steps if st.patch]
    if ordered != series:
        raise PatchsetError(
            "patches/features.toml lists features in another order than patches/series; a PR "
            "branch applies them in series order: reorder the features"
        )
    patch_names: dict[int, set[str]] = {}
    for index, step in enumerate(steps):
        if step.patch:
            text = (project.patches_dir / step.patch).read_text(errors="replace")
            # Added lines, without comments (a module named in a comment is not needed).
            patch_names[index] = patch_added_names(text)
    place: dict[str, int] = {}
    sources: dict[str, Path] = {}
    for feature in features:
        indices = feature_steps[feature.name]
        for rel in owned.get(feature.name, []):
            sources[rel] = project.overlay_dir / rel
            module = module_name(rel)
            hits = [
                i
                for i in indices
                if i in patch_names and module and mentions(patch_names[i], module)
            ]
            place[rel] = min(hits) if hits else max(indices)
        for rel in project_test_files(project, feature):
            sources[rel] = project.root / rel
            place[rel] = max(indices)
    modules = {module_name(rel): rel for rel in place if module_name(rel)}
    deps: dict[str, set[str]] = {}
    for rel, src in sources.items():
        needed = set()
        if rel.endswith(".py"):
            names = python_imports(rel, src.read_text(errors="replace"))
            needed = {dep for mod, dep in modules.items() if dep != rel and mentions(names, mod)}
        parts = rel.split("/")
        for i in range(1, len(parts)):
            init = "/".join(parts[:i]) + "/__init__.py"
            if init in place and init != rel:
                needed.add(init)
        deps[rel] = needed
    warnings = []
    changed = True
    while changed:
        changed = False
        for rel in sorted(place):
            for dep in sorted(deps[rel]):
                if place[dep] > place[rel]:
                    place[dep] = place[rel]
                    changed = True
    for rel, index in sorted(place.items()):
        step = steps[index]
        step.files.append(rel)
        owner = next((f.name for f in features if rel in owned.get(f.name, [])), None)
        if owner and owner != step.feature.name:
            warnings.append(
                f"{rel} (feature {owner}) is needed by a commit of feature {step.feature.name}; "
                "it is committed there (move it to that feature in patches/features.toml)"
            )
    for step in steps:
        step.files.sort()
    return steps, warnings


def pr_message(message: str, identity: tuple[str, str], files: list[str]) -> str:
    """A commit message for upstream: no project trailers, the runner's sign-off (DCO) last."""
    lines = message.rstrip("\n").split("\n")
    # Trailers: the last paragraph when it is all "Key: value" lines.
    cut = len(lines)
    while cut > 0 and re.match(r"^[A-Za-z0-9-]+: ", lines[cut - 1]):
        cut -= 1
    has_trailers = cut < len(lines) and (cut == 0 or not lines[cut - 1].strip())
    body, trailers = (lines[:cut], lines[cut:]) if has_trailers else (lines, [])
    while body and not body[-1].strip():
        body.pop()
    tool = f"{TOOL_IDENTITY[0]} <{TOOL_IDENTITY[1]}>"
    trailers = [
        t
        for t in trailers
        if not t.startswith(("Upstream-Status:", f"{OVERLAY_TRAILER}:"))
        and t != f"Signed-off-by: {tool}"
    ]
    mine = f"Signed-off-by: {identity[0]} <{identity[1]}>"
    if mine in trailers:
        trailers.remove(mine)
    trailers.append(mine)
    out = body
    if files:
        out += ["", "New files:"] + [f"  {rel}" for rel in files]
    return "\n".join(out + [""] + trailers) + "\n"


def apply_one_patch(
    project: Project, tree: Path, name: str, base: str, *, three_way: bool, data: bytes = b""
) -> str:
    """``git am`` one series patch (or ``data``, its resolution for ``base``) without its
    Upstream-Status; '' or git's error on conflict."""
    data = data or (project.patches_dir / name).read_bytes()
    data = re.sub(rb"(?m)^Upstream-Status: .*\n", b"", data)
    am = ["am", "-q", "--committer-date-is-author-date", "--keep-cr"]
    am.append("--3way" if three_way else "--no-3way")
    proc = git(tree, *am, input=data, check=False)
    if proc.returncode == 0:
        return ""
    git(tree, "am", "--abort", check=False)
    return (proc.stdout + proc.stderr).decode(errors="replace").strip() or "git am failed"


def resolve_base(project: Project, base: str | None) -> str:
    """The upstream commit a PR branch starts from: BASE (full sha or a ref in the cache)."""
    pin = project.pin
    ensure_commit_in_cache(pin.sha, pin)
    if not base:
        return pin.sha
    if not re.fullmatch(r"[0-9a-f]{40}", base):
        proc = git(cache_dir(), "rev-parse", "--verify", "-q", f"{base}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise PatchsetError(f"BASE={base}: give a full 40-hex upstream commit id")
        base = proc.stdout.decode().strip()
    ensure_commit_in_cache(base, pin, what="upstream commit BASE")
    return base


def cmd_pr_branch(project: Project, args: argparse.Namespace) -> None:
    identity = runner_identity(project)
    pin = project.pin
    features = feature_closure(project, args.feature)
    base = resolve_base(project, args.base)
    build = project.build
    init_checkout(build, pin.sha)
    if not has_commit(build, base):
        git(build, "fetch", "-q", "--no-tags", str(cache_dir()), f"refs/falcon-mcore/pins/{base}")
    steps, warnings = pr_plan(project, features)
    on_pin = base == pin.sha
    if not on_pin:
        seed_series_objects(project, build)  # blobs that 3-way merges onto BASE need
    out_dir = project.root / "build" / "pr" / args.feature
    branch = f"pr/{args.feature}"
    conflicts = []
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-pr.") as tmp:
        with with_worktree(build, Path(tmp) / "wt", base) as wt:
            upstream_files = set(ls_tree(wt, base))
            clash = sorted(
                rel
                for st in steps
                for rel in st.files
                if rel in upstream_files and rel not in {p for f in features for p in f.replaces}
            )
            if clash:
                raise PatchsetError(
                    f"new files of the PR branch exist upstream at {base[:12]}: " + ", ".join(clash)
                )
            base_date = git_out(wt, "show", "-s", "--format=%cI", base)
            # On another base (UPSTREAM_MAIN), patches that conflict there have resolutions.
            resolutions = {} if on_pin else load_resolutions(project, base)[0]
            for step in steps:
                if step.patch:
                    res = resolutions.get(patch_slug(step.patch))
                    original = (project.patches_dir / step.patch).read_bytes()
                    data = res.path.read_bytes() if res and res.fresh(original) else b""
                    error = apply_one_patch(
                        project, wt, step.patch, base, three_way=not on_pin, data=data
                    )
                    if error:
                        conflicts.append((step.patch, error))
                        continue
                for rel in step.files:
                    src = (
                        project.overlay_dir / rel
                        if (project.overlay_dir / rel).is_file()
                        else project.root / rel
                    )
                    dst = wt / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                    os.chmod(dst, 0o755 if os.access(src, os.X_OK) else 0o644)
                if step.files:
                    git(wt, "add", "-f", "--", *step.files)
                _commit_pr_step(wt, step, identity, base_date)
            if conflicts:
                detail = "\n".join(
                    f"  {name}:\n    " + "\n    ".join(msg.splitlines()[:6])
                    for name, msg in conflicts
                )
                raise PatchsetError(
                    f"{len(conflicts)} patch(es) of {args.feature} do not apply on {base[:12]} "
                    f"(3-way merge failed); nothing was written:\n{detail}\n"
                    f"See `make rebase-upstream BASE={base}` to resolve them for the whole series."
                )
            head = git_out(wt, "rev-parse", "HEAD")
            git(build, "branch", "-f", branch, head)
            rendered = render_patches(wt, base, head)
            strings = pr_project_strings(wt, base, head)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name, data in rendered.items():
        (out_dir / name).write_bytes(data)
    deps = [f.name for f in features if f.name != args.feature]
    print(
        f"[pr-branch] branch {branch} in {build} ({len(rendered)} commits on {base[:12]}, "
        f"authored and signed off by {identity[0]} <{identity[1]}>)"
        + (f", stacked on: {', '.join(deps)}" if deps else "")
        + f"\n[pr-branch] patches: {out_dir}"
    )
    for warning in warnings:
        print(f"[pr-branch] warning: {warning}")
    for finding in strings:
        print(f"[pr-branch] project-only string: {finding}")
    if strings:
        print(
            f"[pr-branch] {len(strings)} lines of upstream code name this project or its "
            "directories (listed above): reword them before opening the PR"
        )
    if args.verify:
        verify_pr_branch(project, args, features, steps, branch, base, strings)


def pr_project_strings(tree: Path, base: str, head: str) -> list[str]:
    """Lines that ``base..head`` adds and that name the project (falcon-mcore, scripts/, ...)."""
    found = []
    for rel, pin_text in series_changes(tree, base, head).items():
        blob = git(tree, "cat-file", "blob", f"{head}:{rel}").stdout
        try:
            text = blob.decode()
        except UnicodeDecodeError:
            continue
        lines = upstream_lint.series_lines(pin_text, text)
        found += [str(f) for f in upstream_lint.project_string_findings(rel, text, lines)]
    return found


def _commit_pr_step(tree: Path, step: PrStep, identity: tuple[str, str], base_date: str) -> None:
    """Commit (a feature's files) or amend (a patch plus its files) as the runner."""
    name, email = identity
    env = {"GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    if step.patch:
        author, author_email, date = git_out(
            tree, "show", "-s", "--format=%an%x00%ae%x00%aI", "HEAD"
        ).split("\0")
        if (author, author_email) == TOOL_IDENTITY:  # the project's bot: the runner is the author
            author, author_email = name, email
        message = pr_message(
            git(tree, "show", "-s", "--format=%B", "HEAD").stdout.decode(), identity, step.files
        )
        env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
        git(
            tree,
            "commit",
            "-q",
            "--amend",
            "--no-verify",
            "--allow-empty",
            f"--author={author} <{author_email}>",
            "-F",
            "-",
            input=message.encode(),
            env=env,
        )
        return
    if not step.files or not staged_changes(tree):
        return
    body = step.feature.description.strip() or f"New files of the {step.feature.name} feature."
    message = pr_message(f"{step.feature.name}: add new files\n\n{body}\n", identity, step.files)
    env.update(
        GIT_AUTHOR_NAME=name,
        GIT_AUTHOR_EMAIL=email,
        GIT_AUTHOR_DATE=base_date,
        GIT_COMMITTER_DATE=base_date,
    )
    git(tree, "commit", "-q", "--no-verify", "-F", "-", input=message.encode(), env=env)


_VERIFY_SCRIPT = r"""
import importlib, importlib.util, json, os, sys, traceback
root = sys.argv[1]
sys.path.insert(0, root)
failures, skipped = [], []
for i, rel in enumerate(sys.argv[2:]):
    parts = rel[:-3].split("/")
    dirs = [os.path.join(root, *parts[:k]) for k in range(1, len(parts))]
    try:
        # A package module (the top directory may be a namespace package, as megatron/ is)
        # by its dotted name; a script in a plain directory by path, with its directory at
        # the end of sys.path (its siblings import; random.py there cannot shadow the stdlib).
        if dirs and all(os.path.isfile(os.path.join(d, "__init__.py")) for d in dirs[1:]) and (
            len(dirs) > 1 or os.path.isfile(os.path.join(dirs[0], "__init__.py"))
        ):
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            importlib.import_module(name)
        else:
            path = os.path.join(root, rel)
            sys.path.append(os.path.dirname(path))
            name = os.path.basename(path)[:-3]
            loaded = sys.modules.get(name)
            where = getattr(loaded, "__file__", None) or ""
            if loaded is not None and os.path.abspath(where) == path:
                continue  # already imported by a sibling script, as it would be when run
            if loaded is not None:
                name = f"_pr_verify_{i}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up there
            spec.loader.exec_module(module)
    except BaseException as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        # A test module that skips itself (pytest.skip(allow_module_level=True), e.g. without a
        # GPU) is what pytest reports as skipped, not an import error.
        skip = getattr(getattr(sys.modules.get("pytest"), "skip", None), "Exception", None)
        if skip is not None and isinstance(exc, skip):
            skipped.append([rel, text])
        else:
            failures.append([rel, text])
print("PR-VERIFY " + json.dumps(failures))
print("PR-VERIFY-SKIPPED " + json.dumps(skipped))
"""


def verify_pr_branch(
    project: Project,
    args: argparse.Namespace,
    features: list[Feature],
    steps: list[PrStep],
    branch: str,
    base: str,
    strings: list[str],
) -> None:
    """Every commit imports the Python modules it adds or changes; the tip passes upstream's
    lint rules (with the lint tools) and, with --run-tests, the feature's tests."""
    python = os.path.abspath(args.python) if args.python else sys.executable
    build = project.build
    commits = git_out(build, "rev-list", "--reverse", f"{base}..{branch}").split()
    problems: list[str] = []
    # No GPU here: Triton kernels' tests import (and run) in Triton's interpreter, as they are
    # run on CPU in `make test`.
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1", TRITON_INTERPRET="1"
    )
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-verify.") as tmp:
        with with_worktree(build, Path(tmp) / "wt", base) as wt:
            for commit in commits:
                git(wt, "checkout", "-q", "-f", "--detach", commit)
                subject = git_out(wt, "show", "-s", "--format=%s", commit)
                changed = (
                    git(
                        wt,
                        "diff-tree",
                        "-r",
                        "-z",
                        "--no-commit-id",
                        "--name-only",
                        "--diff-filter=AM",
                        commit,
                    )
                    .stdout.decode()
                    .split("\0")
                )
                modules = sorted(rel for rel in changed if rel.endswith(".py"))
                if not modules:
                    print(f"[verify] {commit[:12]} {subject}: no Python files")
                    continue
                proc = subprocess.run(
                    [python, "-c", _VERIFY_SCRIPT, str(wt), *modules],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=wt,
                )
                marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("PR-VERIFY ")]
                failures = (
                    json.loads(marker[-1][10:]) if marker else [["(python)", proc.stderr[-800:]]]
                )
                status = "OK" if not failures else f"{len(failures)} failed"
                print(f"[verify] {commit[:12]} {subject}: import {len(modules)} modules: {status}")
                marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("PR-VERIFY-SKIP")]
                for rel, why in json.loads(marker[-1].split(" ", 1)[1]) if marker else []:
                    print(f"[verify]   {rel}: skipped itself ({why.splitlines()[-1]})")
                for rel, error in failures:
                    problems.append(
                        f"{commit[:12]} ({subject}): import {rel}: {error.splitlines()[-1]}"
                    )
            venv = lint_venv(args, project)
            if all((venv / "bin" / tool).exists() for tool in upstream_lint.TOOLS):
                git(wt, "checkout", "-q", "-f", "--detach", commits[-1])
                changes = {
                    rel: pin for rel, pin in series_changes(wt, base).items() if _is_text(wt / rel)
                }
                findings, _notes = upstream_lint.lint_files(venv, wt, changes)
                findings = [f for f in findings if f.tool != "project-strings"]
                for finding in findings:
                    print(f"[verify] lint: {finding}")
                print(f"[verify] upstream lint at the tip: {len(findings)} findings")
                problems += [f"lint: {f}" for f in findings]
            else:
                print(f"[verify] upstream lint skipped: no lint tools in {venv} (make lint-venv)")
            if args.run_tests:
                tests = sorted(
                    rel
                    for st in steps
                    if st.feature.name == args.feature
                    for rel in st.files
                    if rel.startswith("tests/")
                    and Path(rel).name.startswith("test_")
                    and rel.endswith(".py")
                )
                if not tests:
                    problems.append(f"feature {args.feature} has no test files in its PR branch")
                else:
                    print(f"[verify] pytest at the tip: {' '.join(tests)}", flush=True)
                    proc = subprocess.run(
                        [
                            python,
                            "-m",
                            "pytest",
                            "-q",
                            "-rs",  # why tests skipped themselves (e.g. no GPU here)
                            "-p",
                            "no:cacheprovider",
                            "-m",
                            "not gpu",
                            *tests,
                        ],
                        cwd=wt,
                        env=dict(env, PYTHONPATH=str(wt)),
                    )
                    if proc.returncode != 0:
                        problems.append(
                            f"the feature's tests fail at the tip (pytest exit {proc.returncode})"
                        )
    problems += [f"project-only string: {s}" for s in strings]
    if problems:
        raise PatchsetError(f"{branch} does not pass verification:\n  " + "\n  ".join(problems))
    print(f"[verify] {branch}: every commit imports its modules; upstream checks pass")


# --------------------------------------------------------------------------------------------
# the second upstream base (UPSTREAM_MAIN) and its conflict resolutions (patches/bases/)

MAIN_BASE_FILE = "UPSTREAM_MAIN"
RESOLVES_NOTE = "Falcon-Mcore-Resolves"
_RESOLVES_RE = re.compile(
    rf"^{RESOLVES_NOTE}: (?P<name>\S+\.patch) fingerprint (?P<fp>[0-9a-f]{{20}})$", re.M
)


@dataclass
class MainBase:
    """The second upstream base (``UPSTREAM_MAIN``): a recent commit of upstream's main branch
    that the series must also apply to, with resolutions where a patch conflicts."""

    url: str
    branch: str
    sha: str

    @classmethod
    def load(cls, root: Path) -> "MainBase | None":
        """Parse ``key = value`` lines (``#`` starts a comment); None when the file is absent."""
        path = root / MAIN_BASE_FILE
        if not path.is_file():
            return None
        values: dict[str, str] = {}
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise PatchsetError(f"{path}:{lineno}: expected 'key = value', got {raw!r}")
            key, value = (part.strip() for part in line.split("=", 1))
            values[key] = value
        missing = [k for k in ("url", "branch", "sha") if not values.get(k)]
        if missing:
            raise PatchsetError(f"{path}: missing {', '.join(missing)}")
        if not re.fullmatch(r"[0-9a-f]{40}", values["sha"]):
            raise PatchsetError(f"{path}: sha must be a full 40-hex commit id, got {values['sha']}")
        return cls(values["url"], values["branch"], values["sha"])


def patch_fingerprint(data: bytes) -> str:
    """What a resolution records of the patch it resolves: the patch's message and its diff
    (``git patch-id --stable``: line numbers, index lines and whitespace do not count), so
    renumbering the series keeps a resolution valid and any edit of the patch makes it stale."""
    head = data.split(b"\n---\n", 1)[0]
    start = head.find(b"\nSubject: ")
    message = head[start + 1 :] if start >= 0 else head
    proc = subprocess.run(
        ["git", "patch-id", "--stable"], input=data, capture_output=True, env=git_env()
    )
    patch_id = proc.stdout.split(b" ", 1)[0]
    return hashlib.sha256(message + b"\0" + patch_id).hexdigest()[:20]


def resolutions_dir(project: Project, base: str) -> Path:
    """Where the resolutions of the series on upstream commit ``base`` live."""
    return project.patches_dir / "bases" / base[:12]


@dataclass
class Resolution:
    """A resolved version of a series patch for one upstream base."""

    path: Path
    resolves: str  # the patches/ file name it was made from
    fingerprint: str  # patch_fingerprint of that patch when it was resolved

    def rel(self, project: Project) -> str:
        return self.path.relative_to(project.root).as_posix()

    def fresh(self, original: bytes) -> bool:
        return patch_fingerprint(original) == self.fingerprint


def load_resolutions(project: Project, base: str) -> tuple[dict[str, Resolution], list[str]]:
    """{patch slug: resolution} of ``base``, and problems with malformed files."""
    directory = resolutions_dir(project, base)
    found: dict[str, Resolution] = {}
    problems = []
    for path in sorted(directory.glob("*.patch")) if directory.is_dir() else []:
        rel = path.relative_to(project.root).as_posix()
        match = _RESOLVES_RE.search(path.read_text(errors="replace").split("\ndiff --git ", 1)[0])
        if not match:
            problems.append(
                f"{rel}: no '{RESOLVES_NOTE}: <patch> fingerprint <hex>' line after '---' "
                "(write resolutions with `make rebase-upstream`)"
            )
            continue
        slug = patch_slug(match.group("name"))
        if slug in found:
            problems.append(f"{rel} and {found[slug].rel(project)} resolve the same patch")
            continue
        found[slug] = Resolution(path, match.group("name"), match.group("fp"))
    return found, problems


def annotate_resolution(data: bytes, name: str, original: bytes, base: str) -> bytes:
    """Add the note naming the patch (and its fingerprint) to a format-patch mail; git am
    ignores text between '---' and the diff."""
    note = (
        f"{RESOLVES_NOTE}: {name} fingerprint {patch_fingerprint(original)}\n"
        f"Falcon-Mcore-Base: {base}\n"
    ).encode()
    head, sep, rest = data.partition(b"\n---\n")
    if not sep:
        raise PatchsetError(f"format-patch output for {name} has no '---' line")
    return head + sep + note + rest


def am_patch(tree: Path, data: bytes, *, three_way: bool, keep_conflict: bool = False) -> str:
    """``git am`` one mail onto ``tree``; '' on success, else git's message. The failed am is
    aborted unless ``keep_conflict`` (then conflict markers stay for someone to resolve)."""
    am = ["am", "-q", "--committer-date-is-author-date", "--keep-cr"]
    am.append("--3way" if three_way else "--no-3way")
    proc = git(tree, *am, input=data, check=False)
    if proc.returncode == 0:
        return ""
    message = (proc.stdout + proc.stderr).decode(errors="replace").strip() or "git am failed"
    unmerged = git_out(tree, "diff", "--name-only", "--diff-filter=U", check=False).split()
    if unmerged:
        message += "\nconflicts in: " + " ".join(unmerged)
    if not keep_conflict:
        git(tree, "am", "--abort", check=False)
    return message


def conflict_files(message: str) -> list[str]:
    """Files left with conflict markers, as am_patch's message lists them."""
    match = re.search(r"^conflicts in: (.*)$", message, re.M)
    return match.group(1).split() if match else []


def resolve_upstream_commit(project: Project, given: str | None, what: str) -> str:
    """A full sha in the cache: ``given`` (sha or a ref the cache knows) or UPSTREAM_MAIN."""
    pin = project.pin
    ensure_commit_in_cache(pin.sha, pin)
    source = pin
    if not given:
        main = MainBase.load(project.root)
        if main is None:
            raise PatchsetError(
                f"no {what} given and no {MAIN_BASE_FILE} file (url, branch, sha of the second "
                "upstream base) in the project"
            )
        given = main.sha
        source = Pin(main.url, pin.tag, main.sha)
    if not re.fullmatch(r"[0-9a-f]{40}", given):
        proc = git(cache_dir(), "rev-parse", "--verify", "-q", f"{given}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise PatchsetError(f"{what}={given}: give a full 40-hex upstream commit id")
        given = proc.stdout.decode().strip()
    ensure_commit_in_cache(given, source, what=f"upstream commit {what}")
    return given


def added_conflict_markers(tree: Path, base: str) -> list[str]:
    """'path: line' for conflict markers that ``base..HEAD`` adds (a resolution committed with
    its markers still in)."""
    diff = git(tree, "diff", "-U0", "--no-color", base, "HEAD").stdout.decode(errors="replace")
    found, current = [], "?"
    for line in diff.splitlines():
        if line.startswith("+++ "):
            current = line[6:] if line.startswith("+++ b/") else line[4:]
        elif re.match(r"^\+(<{7}|>{7})( |$)|^\+={7}$", line):
            found.append(f"{current}: {line[1:].strip()}")
    return found


def rebase_command(project: Project, base: str) -> str:
    """The make command that rebases onto ``base`` (BASE= only where it is not UPSTREAM_MAIN's)."""
    main = MainBase.load(project.root)
    return "make rebase-upstream" + ("" if main and main.sha == base else f" BASE={base}")


def survey_base(project: Project, tree: Path, base: str) -> tuple[list[str], list[str]]:
    """Apply the series (resolutions where they exist, else 3-way) and the overlay on ``tree``
    (checked out at ``base``); return (one line per patch, problems). Goes on after a problem,
    so every conflicting patch and every stale resolution is named."""
    short = base[:12]
    rebase = rebase_command(project, base)
    resolutions, problems = load_resolutions(project, base)
    rows = []
    series = project.series()
    slugs = {patch_slug(n) for n in series}
    for name in series:
        original = (project.patches_dir / name).read_bytes()
        res = resolutions.get(patch_slug(name))
        if res is not None and res.fresh(original):
            error = am_patch(tree, res.path.read_bytes(), three_way=True)
            if error:
                problems.append(
                    f"{res.rel(project)} (resolution of patches/{name}) does not apply on "
                    f"{short}: run `{rebase}` and resolve it again:\n    "
                    + "\n    ".join(error.splitlines()[:6])
                )
                rows.append(f"  FAILED     {name}  (its resolution does not apply)")
            else:
                rows.append(f"  resolved   {name}  ({res.rel(project)})")
            continue
        if res is not None:
            problems.append(
                f"{res.rel(project)} is stale: it resolves {res.resolves} as it was when resolved "
                f"(fingerprint {res.fingerprint}), and patches/{name} has changed since "
                f"(fingerprint {patch_fingerprint(original)}): run `{rebase}` and resolve the "
                "patch again"
            )
        if not am_patch(tree, original, three_way=False):
            rows.append(f"  applies    {name}" + ("  (STALE resolution)" if res else ""))
            continue
        error = am_patch(tree, original, three_way=True)
        if not error:
            rows.append(f"  3-way      {name}" + ("  (STALE resolution)" if res else ""))
            continue
        files = conflict_files(error)
        where = f" in {', '.join(files)}" if files else ""
        if res is None:
            problems.append(
                f"patches/{name} conflicts on upstream {short}{where} and has no resolution in "
                f"{resolutions_dir(project, base).relative_to(project.root)}/: run `{rebase}` and "
                "resolve it"
            )
        rows.append(f"  CONFLICT   {name}{where}" + ("  (STALE resolution)" if res else ""))
        if res is not None and not am_patch(tree, res.path.read_bytes(), three_way=True):
            continue  # the stale resolution keeps the later patches' context
    for slug, res in sorted(resolutions.items()):
        if slug not in slugs:
            problems.append(
                f"{res.rel(project)} resolves {res.resolves}, which is not in patches/series: "
                f"delete it (or run `{rebase}`)"
            )
    date = git_out(tree, "show", "-s", "--format=%cI", base)
    for feature, files in overlay_assignment(project).items():
        try:
            commit_overlay(project, tree, feature, files, base, date)
        except PatchsetError as exc:
            problems.append(f"overlay on {short}: {exc}")
    problems += [
        f"conflict marker on {short}: {marker}" for marker in added_conflict_markers(tree, base)
    ]
    for rel in sorted(series_changes(tree, base)):
        if rel.endswith(".py") and (tree / rel).is_file():
            try:
                compile((tree / rel).read_bytes(), rel, "exec")
            except (SyntaxError, ValueError) as exc:
                problems.append(f"{rel} on {short} does not compile: {exc}")
    return rows, problems


def seed_series_objects(project: Project, repo: Path) -> str:
    """Apply the series on the pin in a scratch worktree of ``repo``; return its tip. A 3-way
    merge onto another base needs the blobs a patch's index lines name (the file as the earlier
    patches left it at the pin), and only this makes sure ``repo`` has them."""
    pin = project.pin
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-seed.") as tmp:
        with with_worktree(repo, Path(tmp) / "pin", pin.sha) as tree:
            apply_series(project, tree, pin.sha)
            return git_out(tree, "rev-parse", "HEAD")


def cmd_check_base(project: Project, args: argparse.Namespace) -> None:
    base = resolve_upstream_commit(project, args.base, "BASE")
    with tempfile.TemporaryDirectory(prefix="falcon-mcore-check-base.") as tmp:
        tree = Path(tmp) / "Megatron-LM"
        tree.mkdir()
        git(tree, "init", "-q")
        git(tree, "config", "core.autocrlf", "false")
        # Borrow the cache's objects (read-only) instead of copying two upstream trees.
        alternates = tree / ".git" / "objects" / "info" / "alternates"
        alternates.write_text(f"{(cache_dir() / 'objects').resolve()}\n")
        seed_series_objects(project, tree)
        git(tree, "checkout", "-q", "-f", "--detach", base)
        rows, problems = survey_base(project, tree, base)
    print(f"[check-base] the series on upstream {base}:")
    print("\n".join(rows))
    if problems:
        raise PatchsetError(
            f"the series does not apply on upstream {base[:12]}:\n  " + "\n  ".join(problems)
        )
    used = sum(row.lstrip().startswith("resolved") for row in rows)
    print(
        f"[check-base] OK: {len(rows)} patches on {base[:12]} ({used} through resolutions in "
        f"{resolutions_dir(project, base).relative_to(project.root)}/) and "
        f"{len(project.overlay_files())} overlay files"
    )


def _am_in_progress(tree: Path) -> bool:
    return Path(
        git_out(tree, "rev-parse", "--path-format=absolute", "--git-path", "rebase-apply")
    ).is_dir()


def _rebase_instructions(wt: Path, name: str, files: list[str], again: str) -> str:
    rel = os.path.relpath(wt, Path.cwd())
    return (
        f"patches/{name} conflicts; git am stopped in {rel} with conflict markers"
        + (f" in: {', '.join(files)}" if files else "")
        + ".\nResolve it there, keeping the patch's intent (its message says what it does; take "
        "upstream's new code around it):\n"
        f"  cd {rel}\n"
        "  # edit the files, then\n"
        "  git add -A && git am --continue\n"
        f"and go on with `{again} CONTINUE=1` (RESTART=1 starts over).\n"
        f"The original patch is patches/{name}; `git am --show-current-patch=diff` shows it."
    )


def cmd_rebase(project: Project, args: argparse.Namespace) -> None:
    """Apply the series on another upstream commit, one patch at a time, stopping at a patch
    that conflicts so it can be resolved; at the end write the resolutions to patches/bases/."""
    pin = project.pin
    base = resolve_upstream_commit(project, args.base, "BASE")
    short = base[:12]
    again = rebase_command(project, base)
    build = project.build
    init_checkout(build, pin.sha)
    if not has_commit(build, base):
        git(build, "fetch", "-q", "--no-tags", str(cache_dir()), f"refs/falcon-mcore/pins/{base}")
    work = project.root / "build" / "rebase" / short
    wt = work / "Megatron-LM"
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    series = project.series()
    old_head = seed_series_objects(project, build)  # the series on the pin, for 3-way merges
    if args.continue_:
        if state is None or not (wt / ".git").exists():
            raise PatchsetError(f"no rebase onto {short} in progress: run `{again}`")
        if _am_in_progress(wt):
            raise PatchsetError(
                f"git am is still in progress in {wt}: resolve the conflict, `git add -A && git "
                f"am --continue` there, then `{again} CONTINUE=1`"
            )
        applied = state["applied"]
        if [a["patch"] for a in applied] != series[: len(applied)]:
            raise PatchsetError(
                f"patches/series changed since this rebase started: `{again} RESTART=1` "
                "starts over"
            )
        stopped = state.get("stopped")
        if stopped:
            head = git_out(wt, "rev-parse", "HEAD")
            subject = git_out(wt, "show", "-s", "--format=%s", "HEAD")
            wanted = _mail_subject((project.patches_dir / stopped).read_bytes())
            if head == state["stopped_at"] or subject != wanted:
                raise PatchsetError(
                    f"{wt}: HEAD is not the resolved commit of patches/{stopped} (expected a new "
                    f"commit '{wanted}' on {state['stopped_at'][:12]}); finish it with `git am "
                    "--continue` there"
                )
            applied.append({"patch": stopped, "how": "resolved", "commit": head})
            state["stopped"] = None
    else:
        if state and state.get("stopped") and (wt / ".git").exists() and not args.restart:
            raise PatchsetError(
                f"a rebase onto {short} stopped at patches/{state['stopped']} in {wt}: finish it "
                f"and run `{again} CONTINUE=1`, or start over with RESTART=1 "
                "(drops the work in that tree)"
            )
        git(build, "worktree", "remove", "--force", str(wt), check=False)
        git(build, "worktree", "prune", check=False)
        if wt.exists():
            shutil.rmtree(wt)
        work.mkdir(parents=True, exist_ok=True)
        git(build, "worktree", "add", "-q", "--detach", str(wt), base)
        state = {"base": base, "applied": [], "stopped": None}
        with tempfile.TemporaryDirectory(prefix="falcon-mcore-rebase.") as tmp:
            with with_worktree(build, Path(tmp) / "survey", base) as survey:
                rows, problems = survey_base(project, survey, base)
        print(f"[rebase] the series on upstream {base}, as committed:")
        print("\n".join(rows))
        for problem in problems:
            print(f"[rebase] {problem.splitlines()[0]}")
    resolutions, problems = load_resolutions(project, base)
    main = MainBase.load(project.root)
    fallback: dict[str, Resolution] = {}
    if main and main.sha != base:  # moving to a new base: try the current base's resolutions
        fallback = load_resolutions(project, main.sha)[0]
    for name in series[len(state["applied"]) :]:
        original = (project.patches_dir / name).read_bytes()
        own = resolutions.get(patch_slug(name))
        moved = fallback.get(patch_slug(name))  # the current base's, when moving to a new one
        # This base's resolution; else the patch itself; else the current base's resolution.
        if (
            own is not None
            and own.fresh(original)
            and not am_patch(wt, own.path.read_bytes(), three_way=True)
        ):
            how = "resolution"
        elif not am_patch(wt, original, three_way=True):
            how = "clean"
        elif (
            moved is not None
            and moved.fresh(original)
            and not am_patch(wt, moved.path.read_bytes(), three_way=True)
        ):
            how = "resolution"
        else:
            error = am_patch(wt, original, three_way=True, keep_conflict=True)
            state["stopped"] = name
            state["stopped_at"] = git_out(wt, "rev-parse", "HEAD")
            atomic_write(state_path, json.dumps(state, indent=1).encode())
            note = ""
            if own is not None:
                note = (
                    f"{own.rel(project)} is stale (patches/{name} changed since it was made).\n"
                    if not own.fresh(original)
                    else f"{own.rel(project)} no longer applies on {short}.\n"
                )
            print("\n".join("    " + ln for ln in error.splitlines()[:12]))
            raise PatchsetError(note + _rebase_instructions(wt, name, conflict_files(error), again))
        state["applied"].append(
            {"patch": name, "how": how, "commit": git_out(wt, "rev-parse", "HEAD")}
        )
        atomic_write(state_path, json.dumps(state, indent=1).encode())
    # Every patch is on the new base: write the resolutions, then the overlay and a report.
    out_dir = resolutions_dir(project, base)
    keep = set()
    written = []
    for entry in state["applied"]:
        if entry["how"] == "clean":
            continue
        name = entry["patch"]
        data = git(wt, *FORMAT_PATCH_ARGS, "--stdout", "-1", entry["commit"]).stdout
        data = annotate_resolution(data, name, (project.patches_dir / name).read_bytes(), base)
        target = out_dir / name
        keep.add(name)
        if not target.is_file() or target.read_bytes() != data:
            atomic_write(target, data)
            written.append(target.relative_to(project.root).as_posix())
    removed = []
    for path in sorted(out_dir.glob("*.patch")) if out_dir.is_dir() else []:
        if path.name not in keep:
            path.unlink()
            removed.append(path.relative_to(project.root).as_posix())
    new_series = git_out(wt, "rev-parse", "HEAD")
    date = git_out(wt, "show", "-s", "--format=%cI", base)
    for feature, files in overlay_assignment(project).items():
        commit_overlay(project, wt, feature, files, base, date)
    new_head = git_out(wt, "rev-parse", "HEAD")
    git(build, "branch", "-f", f"rebase/{short}", new_head)
    git(build, "branch", "-f", f"rebase/{short}-old", old_head)
    state["done"] = True
    atomic_write(state_path, json.dumps(state, indent=1).encode())
    range_diff = git(
        build, "range-diff", "--no-color", f"{pin.sha}..{old_head}", f"{base}..{new_series}"
    ).stdout.decode()
    resolved = [e["patch"] for e in state["applied"] if e["how"] != "clean"]
    lines = [f"the series of patches/ on upstream {base} (pin {pin.sha})", ""]
    lines.append(
        f"{len(series) - len(resolved)} patches apply as they are (3-way allowed); "
        f"{len(resolved)} through resolutions in {out_dir.relative_to(project.root)}/:"
    )
    lines += [f"  {name}" for name in resolved]
    lines += [f"  wrote {rel}" for rel in written] + [f"  removed {rel}" for rel in removed]
    lines += [
        "",
        f"branch rebase/{short} in {build} (the series and the overlay on {short}); "
        f"rebase/{short}-old: the series on the pin",
        "",
        "range-diff of the series, pin..new:",
        range_diff,
    ]
    report = "\n".join(lines)
    atomic_write(work / "report.txt", report.encode())
    print(report)
    print(f"[rebase] report: {work / 'report.txt'}")
    if problems:
        raise PatchsetError("\n".join(problems))
    if written or removed:
        print(f"[rebase] commit {out_dir.relative_to(project.root)}/ (`make test` checks it)")
    if not main or main.sha != base:
        print(
            f"[rebase] to make {short} the second base, set `sha = {base}` in {MAIN_BASE_FILE} "
            "and delete the old base's directory under patches/bases/"
        )


def _mail_subject(data: bytes) -> str:
    """The commit subject git am makes of a format-patch mail (folded lines joined)."""
    head = data.split(b"\n\n", 1)[0].decode(errors="replace")
    match = re.search(r"^Subject: (.*(?:\n[ \t].*)*)", head, re.M)
    subject = re.sub(r"\n[ \t]+", " ", match.group(1)) if match else ""
    return re.sub(r"^\[PATCH[^\]]*\]\s*", "", subject).strip()


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--build", type=Path, help="build tree (default: <root>/build/Megatron-LM)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("upstream", help="fetch the pinned commit into the cache")
    p = sub.add_parser("apply", help="(re)create the build tree from the pin + series + overlay")
    p.add_argument("--discard", action="store_true", help="set unexported commits aside first")
    p = sub.add_parser("export", help="write build-tree commits back to patches/ + overlay")
    p.add_argument("--force", action="store_true", help="overwrite patches/ changed since apply")
    p = sub.add_parser("check", help="lint, zero-fuzz apply, round-trip identity")
    p.add_argument(
        "--lint",
        choices=["off", "report", "strict"],
        default="off",
        help="upstream's black/isort/pylint/ruff/header rules: off, report findings, or fail",
    )
    p.add_argument("--lint-venv", help="virtualenv with the lint tools (default: .venv-lint)")
    sub.add_parser("guard", help="fail if the build tree holds work that was not exported")
    p = sub.add_parser("format", help="black + isort + headers on what the series adds/changes")
    p.add_argument("--lint-venv", help="virtualenv with the lint tools (default: .venv-lint)")
    p = sub.add_parser("pr-branch", help="branch + format-patch of one feature for upstream")
    p.add_argument("--feature", required=True)
    p.add_argument("--base", help="upstream commit to start from (default: the pin)")
    p.add_argument("--verify", action="store_true", help="check every commit of the branch")
    p.add_argument("--run-tests", action="store_true", help="with --verify: pytest at the tip")
    p.add_argument("--python", help="interpreter for --verify (default: this one)")
    p.add_argument("--lint-venv", help="virtualenv with the lint tools (default: .venv-lint)")
    p = sub.add_parser(
        "rebase", help="apply the series on another upstream commit and resolve its conflicts"
    )
    p.add_argument("--base", help=f"upstream commit (default: sha of {MAIN_BASE_FILE})")
    p.add_argument("--new", dest="base", help=argparse.SUPPRESS)  # the former name of --base
    p.add_argument("--continue", dest="continue_", action="store_true", help="after a conflict")
    p.add_argument("--restart", action="store_true", help="drop a stopped rebase, start over")
    p = sub.add_parser(
        "check-base", help="check that the series + resolutions + overlay apply on a base"
    )
    p.add_argument("--base", help=f"upstream commit (default: sha of {MAIN_BASE_FILE})")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    build = (args.build or root / "build" / "Megatron-LM").resolve()
    project = Project(root=root, build=build)
    commands = {
        "upstream": cmd_upstream,
        "apply": cmd_apply,
        "export": cmd_export,
        "check": cmd_check,
        "format": cmd_format,
        "guard": cmd_guard,
        "pr-branch": cmd_pr_branch,
        "rebase": cmd_rebase,
        "check-base": cmd_check_base,
    }
    try:
        commands[args.command](project, args)
    except PatchsetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
