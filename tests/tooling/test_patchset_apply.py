"""`make apply-patches`: build tree = pin + one commit per patch + overlay commits."""

from __future__ import annotations

import json
import shutil

from patchset_testlib import EXECUTABLE_OVERLAY, OVERLAY_FILES, PATCHES, UPSTREAM_FILES, git


def subjects(p, rev_range: str) -> list[str]:
    """Commit subjects of ``rev_range`` in the build tree, oldest first."""
    return p.bgit("log", "--reverse", "--format=%s", rev_range).splitlines()


def test_apply_builds_pin_plus_patches_plus_overlay(proj):
    p = proj
    proc = p.ok("apply")
    assert p.sha[:12] in proc.stdout
    assert p.bgit("rev-parse", "--abbrev-ref", "HEAD") == "falcon-mcore"
    assert p.bgit("rev-parse", "refs/falcon-mcore/pin") == p.sha
    # One commit per patch, in series order, then one overlay commit per feature.
    assert subjects(p, f"{p.sha}..HEAD") == [
        "layers: call the alpha hook",
        "config: add the beta flag",
        "alpha: add falcon-mcore overlay files",
        "beta: add falcon-mcore overlay files",
    ]
    # Each patch commit touches exactly its file; overlay commits carry the trailer.
    log = p.bgit("log", "--reverse", "--format=%H", f"{p.sha}..HEAD").split()
    assert p.bgit("diff-tree", "--no-commit-id", "--name-only", "-r", log[0]) == PATCHES[0][0]
    assert p.bgit("diff-tree", "--no-commit-id", "--name-only", "-r", log[1]) == PATCHES[1][0]
    assert "Falcon-Mcore-Overlay: alpha" in p.bgit("show", "-s", "--format=%B", log[2])
    assert p.bgit("diff-tree", "--no-commit-id", "--name-only", "-r", log[3]) == (
        "megatron/core/beta.py"
    )
    # The patched tree: hooks applied, overlay files present with their modes.
    layers = (p.build / "megatron/core/layers.py").read_text()
    assert "    layers = alpha_hook(layers)\n" in layers
    assert layers == UPSTREAM_FILES["megatron/core/layers.py"].replace(PATCHES[0][1], PATCHES[0][2])
    for rel, text in OVERLAY_FILES.items():
        assert (p.build / rel).read_text() == text
    mode = p.bgit("ls-tree", "HEAD", "--", "tools/alpha_run.sh").split()[0]
    assert mode == "100755" and EXECUTABLE_OVERLAY == {"tools/alpha_run.sh"}
    assert p.bgit("status", "--porcelain") == ""


def test_apply_is_reproducible(proj, tmp_path):
    p = proj
    p.ok("apply")
    head, tree = p.head(), p.tree()

    # Second run: nothing to do, same commit.
    proc = p.ok("apply")
    assert "up to date" in proc.stdout
    assert p.head() == head

    # Forced rebuild of the same inputs: same commit and tree hashes.
    p.ok("apply", "--discard")
    assert (p.head(), p.tree()) == (head, tree)
    assert not p.bgit("for-each-ref", "refs/falcon-mcore/backup/")

    # From scratch (with a date in the environment that must not leak into commits), and in
    # another place: still the same hashes.
    shutil.rmtree(p.root / "build")
    late = "2030-01-01T00:00:00+00:00"
    p.ok("apply", env={"GIT_AUTHOR_DATE": late, "GIT_COMMITTER_DATE": late})
    assert (p.head(), p.tree()) == (head, tree)
    other = tmp_path / "elsewhere"
    proc = p.ok("--build", str(other), "apply")
    assert git(other, "rev-parse", "HEAD") == head


def test_apply_refreshes_after_inputs_change(proj):
    p = proj
    p.ok("apply")
    head = p.head()

    # Edit the hook line inside patch 0001.
    patch = p.patch("0001-layers-call-the-alpha-hook.patch")
    text = patch.read_text()
    assert text.count("+    layers = alpha_hook(layers)\n") == 1
    patch.write_text(text.replace("alpha_hook(layers)", "alpha_hook(layers, 2)"))
    proc = p.ok("apply")
    assert "up to date" not in proc.stdout
    assert "alpha_hook(layers, 2)" in (p.build / "megatron/core/layers.py").read_text()
    assert p.head() != head

    # Edit an overlay file: refreshed too.
    (p.root / "megatron_overlay/megatron/core/beta.py").write_text("BETA = 2\n")
    p.ok("apply")
    assert (p.build / "megatron/core/beta.py").read_text() == "BETA = 2\n"

    # Remove an overlay file: gone from the tree.
    (p.root / "megatron_overlay/megatron/core/beta.py").unlink()
    p.ok("apply")
    assert not (p.build / "megatron/core/beta.py").exists()
    assert "beta: add falcon-mcore overlay files" not in p.bgit("log", "--format=%s")


def test_apply_refuses_uncommitted_edit_and_keeps_it(proj):
    p = proj
    p.ok("apply")
    head = p.head()
    target = p.build / "megatron/core/utils.py"
    edited = target.read_text() + "\n# my unsaved work\n"
    target.write_text(edited)
    untracked = p.build / "megatron/core/new_idea.py"
    untracked.write_text("IDEA = 1\n")
    # Make the inputs change too, so apply would really rebuild if it did not refuse.
    (p.root / "megatron_overlay/megatron/core/beta.py").write_text("BETA = 3\n")

    proc = p.fails("apply")
    assert "uncommitted changes" in proc.stderr
    assert "megatron/core/utils.py" in proc.stderr and "new_idea.py" in proc.stderr
    assert "export-patches" in proc.stderr  # how to keep the work
    assert "stash" in proc.stderr  # how to drop it
    assert target.read_text() == edited
    assert untracked.read_text() == "IDEA = 1\n"
    assert p.head() == head
    # --discard only sets commits aside; it never throws away uncommitted edits.
    p.fails("apply", "--discard")
    assert target.read_text() == edited
    # `make clean` is guarded the same way.
    p.fails("guard")


def test_apply_refuses_unexported_commit_discard_keeps_backup(proj):
    p = proj
    p.ok("apply")
    applied = p.head()
    mine = p.commit_in_build({"megatron/core/utils.py": "X = 1\n"}, "utils: my change")

    proc = p.fails("apply")
    assert "not exported" in proc.stderr
    assert "export-patches" in proc.stderr and "DISCARD=1" in proc.stderr
    assert p.head() == mine
    p.fails("guard")

    proc = p.ok("apply", "--discard")
    assert "refs/falcon-mcore/backup/" in proc.stdout
    backups = p.bgit(
        "for-each-ref", "--format=%(refname) %(objectname)", "refs/falcon-mcore/backup/"
    ).splitlines()
    assert len(backups) == 1 and backups[0].endswith(" " + mine)
    assert p.head() == applied
    p.ok("guard")

    # A second discard right away must not overwrite the first backup.
    mine2 = p.commit_in_build({"megatron/core/utils.py": "X = 2\n"}, "utils: other change")
    p.ok("apply", "--discard")
    refs = p.bgit("for-each-ref", "--format=%(objectname)", "refs/falcon-mcore/backup/").split()
    assert sorted(refs) == sorted([mine, mine2])


def test_export_refuses_when_patches_changed_since_apply(proj):
    p = proj
    p.ok("apply")
    p.commit_in_build({"megatron/core/utils.py": "Y = 1\n"}, "utils: build-tree change")
    patch = p.patch("0002-config-add-the-beta-flag.patch")
    hand_edit = patch.read_text().replace("Beta needs a switch", "Beta really needs a switch")
    patch.write_text(hand_edit)

    proc = p.fails("export")
    assert "changed since the last `make apply-patches`" in proc.stderr
    assert "FORCE=1" in proc.stderr
    assert patch.read_text() == hand_edit
    assert len(list((p.root / "patches").glob("*.patch"))) == 2

    # --force lets the build tree win.
    p.ok("export", "--force")
    assert patch.read_text() != hand_edit
    assert len(list((p.root / "patches").glob("*.patch"))) == 3


def test_export_merges_overlay_edits_three_ways(proj):
    """Overlay files edited in megatron_overlay/ since apply are kept; edits on both sides of
    the same file are a conflict that writes nothing."""
    p = proj
    p.ok("apply")
    overlay = p.root / "megatron_overlay/megatron/core/beta.py"
    overlay.write_text("BETA = 'hand edit'\n")
    p.commit_in_build({"megatron/core/utils.py": "Y = 2\n"}, "utils: change")
    p.ok("export")
    assert overlay.read_text() == "BETA = 'hand edit'\n"
    assert len(list((p.root / "patches").glob("*.patch"))) == 3
    # A second export still keeps it (the base is the tree's version, not the project's).
    p.commit_in_build({"megatron/core/utils.py": "Y = 3\n"}, "utils: change again")
    p.ok("export")
    assert overlay.read_text() == "BETA = 'hand edit'\n"
    # The tree changes the same file too: conflict, nothing written.
    before = p.managed_snapshot()
    p.commit_in_build({"megatron/core/beta.py": "BETA = 'tree edit'\n"}, "beta: tree edit")
    proc = p.fails("export")
    assert "changed both in megatron_overlay/ and in the build tree" in proc.stderr
    assert "megatron/core/beta.py" in proc.stderr
    assert p.managed_snapshot() == before
    # --force lets the build tree win.
    p.ok("export", "--force")
    assert overlay.read_text() == "BETA = 'tree edit'\n"


def test_export_refuses_uncommitted_and_unapplied(proj):
    p = proj
    proc = p.fails("export")
    assert "apply-patches" in proc.stderr
    p.ok("apply")
    (p.build / "megatron/core/utils.py").write_text("Z = 1\n")
    proc = p.fails("export")
    assert "uncommitted" in proc.stderr


def test_failed_apply_then_export_does_not_destroy_patches(proj):
    """A patch that no longer applies must not let export delete patches/ or the overlay."""
    p = proj
    original = p.managed_snapshot()
    patch = p.patch("0002-config-add-the-beta-flag.patch")
    patch.write_text(patch.read_text().replace(' "hidden_size": 8,', ' "hidden_size": 9,'))
    broken = p.managed_snapshot()
    proc = p.fails("apply")
    assert "0002-config-add-the-beta-flag.patch" in proc.stderr and "does not apply" in proc.stderr
    proc = p.fails("export")
    assert "did not finish" in proc.stderr and "FORCE=1" in proc.stderr
    assert p.managed_snapshot() == broken
    # Fixing the patch and applying again works over the half-built tree.
    patch.write_text(patch.read_text().replace(' "hidden_size": 9,', ' "hidden_size": 8,'))
    p.ok("apply")
    p.ok("export")
    assert p.managed_snapshot() == original


def test_apply_after_pr_branch_on_fresh_checkout(proj):
    """pr-branch/rebase before the first apply leave an unborn build repo; apply still works."""
    p = proj
    p.ok("pr-branch", "--feature", "alpha")
    p.ok("apply")
    assert p.bgit("rev-parse", "--abbrev-ref", "HEAD") == "falcon-mcore"
    state = json.loads((p.build / ".git" / "falcon-mcore-state.json").read_text())
    assert state["head"] == p.head() and state["pin"] == p.sha
