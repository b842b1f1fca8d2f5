"""Commits in the build tree -> `make export-patches` -> `make apply-patches` round trip."""

from __future__ import annotations

import re

from patchset_testlib import DEV_EMAIL, DEV_NAME, OVERLAY_FILES, PATCH_NAMES, UPSTREAM_FILES

NEW_PATCHES = [
    "0003-utils-document-identity.patch",
    "0004-config-read-the-gamma-default.patch",
]


def patch_paths(text: str) -> list[str]:
    """Files a patch file changes (from its ``diff --git`` lines)."""
    return re.findall(r"^diff --git a/(\S+) b/", text, re.M)


def test_round_trip(proj):
    p = proj
    p.ok("apply")
    original = p.managed_snapshot()

    # 1. An edit of an upstream file -> a new patch.
    utils = UPSTREAM_FILES["megatron/core/utils.py"].replace(
        '    """Return x."""\n', '    """Return x unchanged (used by the alpha hook)."""\n'
    )
    p.commit_in_build(
        {"megatron/core/utils.py": utils},
        "utils: document identity",
        body="Say what identity is for.",
        date="2024-05-01T10:00:00+00:00",
    )
    # 2. A new file -> overlay only, no patch.
    p.commit_in_build(
        {"megatron/core/alpha/extra.py": "EXTRA = 1\n", "tools/alpha_new.sh": "#!/bin/sh\n"},
        "alpha: add extra",
        executable={"tools/alpha_new.sh"},
        date="2024-05-02T10:00:00+00:00",
    )
    # 3. One commit touching an upstream file, an overlay file, and deleting an overlay file.
    config = (
        (p.build / "megatron/core/config.py")
        .read_text()
        .replace('    "beta_flag": False,\n', '    "beta_flag": False,\n    "gamma": 3,\n')
    )
    p.commit_in_build(
        {
            "megatron/core/config.py": config,
            "megatron/core/beta.py": "BETA = 'gamma-aware'\n",
            "megatron/core/alpha/__init__.py": None,
        },
        "config: read the gamma default",
        body="Gamma needs a default.",
        status="Not-for-upstream",
        date="2024-05-03T10:00:00+00:00",
    )
    user_tree = p.tree()

    proc = p.ok("export")
    assert "updated" in proc.stdout

    patches_dir = p.root / "patches"
    series = (patches_dir / "series").read_text().splitlines()
    assert series == PATCH_NAMES + NEW_PATCHES
    assert sorted(x.name for x in patches_dir.glob("*.patch")) == series
    # The existing patches are reproduced byte for byte.
    for name in PATCH_NAMES:
        assert (patches_dir / name).read_bytes() == original["patches"][name][0]

    p3 = (patches_dir / NEW_PATCHES[0]).read_text()
    assert patch_paths(p3) == ["megatron/core/utils.py"]
    assert "Subject: [PATCH] utils: document identity\n" in p3
    assert f"From: {DEV_NAME} <{DEV_EMAIL}>\n" in p3
    assert "Date: Wed, 1 May 2024 10:00:00 +0000\n" in p3
    assert "\nSay what identity is for.\n" in p3
    assert "\nUpstream-Status: Pending\n" in p3
    assert f"\nSigned-off-by: {DEV_NAME} <{DEV_EMAIL}>\n---\n" in p3
    assert p3.startswith("From 0000000000000000000000000000000000000000 ")
    # format-patch --base=<pin> records the pin at the end of the first patch of the series.
    assert (patches_dir / PATCH_NAMES[0]).read_text().endswith(f"base-commit: {p.sha}\n")
    assert '+    """Return x unchanged (used by the alpha hook)."""' in p3

    p4 = (patches_dir / NEW_PATCHES[1]).read_text()
    assert patch_paths(p4) == ["megatron/core/config.py"]  # overlay parts moved out
    assert "beta.py" not in p4 and "alpha/" not in p4
    assert "\nUpstream-Status: Not-for-upstream\n" in p4
    assert '+    "gamma": 3,' in p4

    overlay = p.root / "megatron_overlay"
    assert (overlay / "megatron/core/alpha/extra.py").read_text() == "EXTRA = 1\n"
    assert (overlay / "megatron/core/beta.py").read_text() == "BETA = 'gamma-aware'\n"
    assert not (overlay / "megatron/core/alpha/__init__.py").exists()
    exported = p.managed_snapshot()
    assert exported["overlay"]["tools/alpha_new.sh"] == (b"#!/bin/sh\n", True)
    assert exported["overlay"]["tools/alpha_run.sh"][1] is True
    assert (
        exported["overlay"]["megatron/core/alpha/hook.py"]
        == original["overlay"]["megatron/core/alpha/hook.py"]
    )
    assert set(exported["overlay"]) == (
        set(OVERLAY_FILES) | {"megatron/core/alpha/extra.py", "tools/alpha_new.sh"}
    ) - {"megatron/core/alpha/__init__.py"}

    # Export is idempotent, and apply after export has nothing to redo.
    assert "unchanged" in p.ok("export").stdout
    assert "up to date" in p.ok("apply").stdout

    # Rebuild from patches/ + megatron_overlay/ alone: the same tree as the user's commits...
    proc = p.ok("apply", "--discard")
    assert "backup" not in proc.stdout  # everything was exported: nothing to set aside
    assert p.tree() == user_tree
    assert p.bgit("log", "--format=%s", "-1", "HEAD~2") == "config: read the gamma default"
    # ... and exporting that rebuild changes nothing, byte for byte.
    assert "unchanged" in p.ok("export").stdout
    assert p.managed_snapshot() == exported

    # With the new patches assigned to features, the whole project passes `check`.
    features = p.root / "patches/features.toml"
    features.write_text(
        features.read_text()
        .replace(
            'patches = ["layers-call-the-alpha-hook"]',
            'patches = ["layers-call-the-alpha-hook"]\n# utils patch below',
        )
        .replace(
            'patches = ["config-add-the-beta-flag"]',
            'patches = ["config-add-the-beta-flag", "utils-document-identity", '
            '"config-read-the-gamma-default"]',
        )
    )
    proc = p.ok("check")
    assert "[check] OK: 4 patches, 5 overlay files" in proc.stdout


def test_export_commit_with_only_overlay_keeps_patches(proj):
    p = proj
    p.ok("apply")
    before = p.managed_snapshot()
    p.commit_in_build({"megatron/core/beta.py": "BETA = False\n"}, "beta: flip")
    p.ok("export")
    after = p.managed_snapshot()
    assert after["patches"] == before["patches"]
    assert after["overlay"]["megatron/core/beta.py"] == (b"BETA = False\n", False)


def test_export_keeps_a_revert_as_its_own_patch(proj):
    """Undoing a patch in a later commit exports the revert; apply gives upstream back."""
    p = proj
    p.ok("apply")
    p.commit_in_build(
        {"megatron/core/config.py": UPSTREAM_FILES["megatron/core/config.py"]},
        "config: drop the beta flag again",
    )
    p.ok("export")
    series = (p.root / "patches/series").read_text().splitlines()
    # Both the original and the revert survive as commits; together they are a no-op on config.
    assert series[:2] == PATCH_NAMES and len(series) == 3
    p.ok("apply", "--discard")
    assert (p.build / "megatron/core/config.py").read_text() == UPSTREAM_FILES[
        "megatron/core/config.py"
    ]
