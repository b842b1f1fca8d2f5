"""`make check-patches`: lint, zero-fuzz apply on a scratch tree, round-trip identity."""

from __future__ import annotations

import re
from typing import Callable

import pytest

P1 = "0001-layers-call-the-alpha-hook.patch"
P2 = "0002-config-add-the-beta-flag.patch"


def edit(path, old: str, new: str, count: int = 1) -> None:
    """Replace ``old`` by ``new`` in a file; the test's premise fails loudly if ``old`` is absent."""
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def features(p):
    return p.root / "patches" / "features.toml"


def overlay(p, rel: str, text: str = "X = 1\n") -> None:
    path = p.root / "megatron_overlay" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_clean_project_passes_and_changes_nothing(proj):
    before = proj.managed_snapshot()
    proc = proj.ok("check")
    assert "[check] OK: 2 patches, 4 overlay files" in proc.stdout
    assert "byte-identical round trip" in proc.stdout
    assert proj.managed_snapshot() == before
    assert not (proj.root / "build").exists()  # the scratch tree lives in a temporary dir


def test_declared_replacement_passes(proj):
    """An overlay file may replace an upstream file when its feature says so."""
    overlay(proj, "megatron/core/utils.py", '"""Replaced utilities."""\n')
    edit(
        features(proj),
        '"tools/alpha_*.sh"]',
        '"tools/alpha_*.sh", "megatron/core/utils.py"]\n' 'replaces = ["megatron/core/utils.py"]',
    )
    proj.ok("check")
    proj.ok("apply")
    assert (proj.build / "megatron/core/utils.py").read_text() == '"""Replaced utilities."""\n'
    # A build-tree edit of a declared replacement goes to the overlay, not into a patch.
    proj.commit_in_build({"megatron/core/utils.py": "REPLACED = 2\n"}, "alpha: new utils")
    proj.ok("export")
    assert (proj.root / "megatron_overlay/megatron/core/utils.py").read_text() == "REPLACED = 2\n"
    assert len(list((proj.root / "patches").glob("*.patch"))) == 2


def _unlisted(p):
    (p.patch("0003-stray.patch")).write_bytes(p.patch(P2).read_bytes())


def _series_missing(p):
    with open(p.patch("series"), "a") as fh:
        fh.write("0003-missing.patch\n")


def _series_twice(p):
    with open(p.patch("series"), "a") as fh:
        fh.write(P2 + "\n")


def _no_subject(p):
    edit(p.patch(P1), "Subject: [PATCH] layers: call the alpha hook\n", "")


def _empty_subject(p):
    edit(p.patch(P1), "Subject: [PATCH] layers: call the alpha hook\n", "Subject: [PATCH] \n")


def _no_body(p):
    edit(
        p.patch(P1),
        "The alpha feature post-processes the layer list. Keep the hook to one line;\n"
        "the logic lives in megatron/core/alpha/.\n\n",
        "",
    )


def _no_status(p):
    edit(p.patch(P1), "Upstream-Status: Pending\n", "")


def _bad_status(p):
    edit(p.patch(P1), "Upstream-Status: Pending\n", "Upstream-Status: Maybe later\n")


def _no_signoff(p):
    edit(p.patch(P2), "Signed-off-by: Test Dev <dev@example.com>\n", "")


def _patch_without_feature(p):
    edit(features(p), 'patches = ["layers-call-the-alpha-hook"]', "patches = []")


def _no_features_file(p):
    features(p).unlink()


def _feature_names_missing_patch(p):
    edit(
        features(p),
        'patches = ["layers-call-the-alpha-hook"]',
        'patches = ["layers-call-the-alpha-hook", "no-such-patch"]',
    )


def _patch_in_two_features(p):
    edit(
        features(p),
        'patches = ["config-add-the-beta-flag"]',
        'patches = ["config-add-the-beta-flag", "layers-call-the-alpha-hook"]',
    )


def _depends_on_later(p):
    edit(
        features(p),
        'overlay = ["megatron/core/alpha/**", "tools/alpha_*.sh"]',
        'overlay = ["megatron/core/alpha/**", "tools/alpha_*.sh"]\ndepends = ["beta"]',
    )


def _unknown_key(p):
    edit(features(p), 'description = "The beta flag."', 'description = "The beta flag."\nowner = 1')


def _overlay_unassigned(p):
    overlay(p, "megatron/other/stray.py")


def _glob_star_one_level(p):
    """``*`` does not cross ``/``: "megatron/*.py" does not own megatron/core/beta.py."""
    edit(features(p), 'overlay = ["megatron/core/beta.py"]', 'overlay = ["megatron/*.py"]')


def _overlay_replaces_undeclared(p):
    overlay(p, "megatron/core/utils.py", '"""Replaced utilities."""\n')
    edit(features(p), '"tools/alpha_*.sh"]', '"tools/alpha_*.sh", "megatron/core/utils.py"]')


def _context_changed(p):
    edit(p.patch(P1), "\n     layers = []\n", "\n     layers = [None]\n")


def _offset(p):
    """Context intact but at another line: git would apply it with an offset."""
    edit(p.patch(P1), "@@ -6,6 +6,7 @@", "@@ -3,6 +3,7 @@")


def _stale_index_line(p):
    """A hand-edited patch whose text no longer matches what export would write."""
    edit(p.patch(P2), '+    "beta_flag": False,', '+    "beta_flag": None,')


LINT_CASES: dict[str, tuple[Callable, str | tuple[str, ...]]] = {
    "unlisted-patch": (_unlisted, "patches/0003-stray.patch is not listed in patches/series"),
    "series-entry-missing": (
        _series_missing,
        "patches/series lists 0003-missing.patch, which does not exist",
    ),
    "series-twice": (_series_twice, "patches/series lists a patch twice"),
    "no-subject": (_no_subject, f"{P1}: no Subject"),
    "empty-subject": (_empty_subject, f"{P1}: no Subject"),
    "no-body": (_no_body, f"{P1}: no body saying why"),
    "no-upstream-status": (_no_status, f"{P1}: no valid 'Upstream-Status:' trailer"),
    "bad-upstream-status": (_bad_status, f"{P1}: no valid 'Upstream-Status:' trailer"),
    "no-signed-off-by": (_no_signoff, f"{P2}: no 'Signed-off-by: Name <email>' trailer"),
    "patch-without-feature": (
        _patch_without_feature,
        f"patches/{P1} belongs to no feature in patches/features.toml",
    ),
    "no-features-file": (
        _no_features_file,
        f"patches/{P2} belongs to no feature in patches/features.toml",
    ),
    "feature-names-missing-patch": (
        _feature_names_missing_patch,
        "feature alpha: patch 'no-such-patch' is not in patches/series",
    ),
    "patch-in-two-features": (
        _patch_in_two_features,
        "patch 'layers-call-the-alpha-hook' is in features alpha and beta",
    ),
    "depends-on-later-feature": (
        _depends_on_later,
        "feature alpha: depends on beta, not an earlier feature",
    ),
    "unknown-feature-key": (_unknown_key, "feature beta: unknown keys ['owner']"),
    "overlay-unassigned": (
        _overlay_unassigned,
        "megatron_overlay/megatron/other/stray.py belongs to no feature in patches/features.toml",
    ),
    "glob-star-one-level": (
        _glob_star_one_level,
        "megatron_overlay/megatron/core/beta.py belongs to no feature in patches/features.toml",
    ),
    "overlay-replaces-undeclared": (
        _overlay_replaces_undeclared,
        "overlay files would replace upstream files without being declared: "
        "megatron/core/utils.py",
    ),
    "context-changed": (_context_changed, (f"patches/{P1} does not apply on ", "(zero fuzz)")),
    "applies-with-offset": (_offset, f"round trip: patches/{P1} differs after apply -> export"),
    "hand-edited-patch": (_stale_index_line, f"round trip: patches/{P2} differs after apply"),
}


@pytest.mark.parametrize("case", sorted(LINT_CASES))
def test_check_reports(proj, case):
    mutate, messages = LINT_CASES[case]
    mutate(proj)
    proc = proj.fails("check")
    for message in [messages] if isinstance(messages, str) else messages:
        assert message in proc.stderr, proc.stderr
    assert "check-patches found problems" in proc.stderr or "features.toml" in proc.stderr


def test_check_lists_every_problem_at_once(proj):
    _no_body(proj)
    _no_signoff(proj)
    _overlay_unassigned(proj)
    proc = proj.fails("check")
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    assert any("no body" in ln for ln in problems)
    assert any("Signed-off-by" in ln for ln in problems)
    assert any("stray.py" in ln for ln in problems)


def test_export_warns_about_lint_problems(proj):
    proj.ok("apply")
    proj.commit_in_build({"megatron/core/utils.py": "W = 1\n"}, "utils: unassigned change")
    proc = proj.ok("export")
    assert re.search(
        r"warning: patches/0003-utils-unassigned-change.patch belongs to no feature", proc.stdout
    )


def test_declared_replacement_not_yet_edited(proj):
    """Declaring `replaces` before editing: export copies the upstream file; apply copes."""
    p = proj
    with open(features(p), "a") as fh:
        fh.write(
            '\n[features.eps]\noverlay = ["megatron/core/utils.py"]\n'
            'replaces = ["megatron/core/utils.py"]\n'
        )
    p.ok("apply")
    p.commit_in_build({"megatron/core/beta.py": "BETA = 5\n"}, "beta: five")
    p.ok("export")
    copied = p.root / "megatron_overlay/megatron/core/utils.py"
    assert copied.read_text() == (p.build / "megatron/core/utils.py").read_text()
    p.ok("apply")
    p.ok("check")


def test_body_line_that_looks_like_a_trailer_is_prose(proj):
    """Only the final trailer block counts as trailers; "Note: ..." in the body is prose."""
    edit(
        proj.patch(P1),
        "The alpha feature post-processes the layer list. Keep the hook to one line;\n"
        "the logic lives in megatron/core/alpha/.\n",
        "Note: upstream has no place to post-process the layer list.\n",
    )
    proc = proj.ok("check")
    assert "[check] OK" in proc.stdout
