"""`make upstream`: the pinned commit is fetched once into the cache, then works offline."""

from __future__ import annotations

import shutil

from patchset_testlib import git, write_pin


def cache_has(cache, sha: str) -> bool:
    """True when the bare cache holds commit ``sha``."""
    try:
        git(cache, "cat-file", "-e", f"{sha}^{{commit}}")
    except AssertionError:
        return False
    return True


def test_fetch_from_megatron_lm_git_then_offline(bare_proj):
    p = bare_proj
    # The pin's url is unusable: only MEGATRON_LM_GIT can provide the commit.
    write_pin(p.root, str(p.tmp / "no-such-repo"), p.sha)
    assert not p.cache.exists()

    proc = p.ok("upstream", env={"MEGATRON_LM_GIT": str(p.upstream)})
    assert p.sha in proc.stdout
    assert cache_has(p.cache, p.sha)
    assert git(p.cache, "rev-parse", f"refs/falcon-mcore/pins/{p.sha}") == p.sha

    # Second run: no variable, source repository gone, no network -> still fine.
    shutil.rmtree(p.upstream)
    proc = p.ok("upstream")
    assert p.sha in proc.stdout
    assert "fetching" not in proc.stdout
    # ... and the build tree can be made from the cache alone.
    p.ok("apply")
    assert git(p.build, "rev-parse", "refs/falcon-mcore/pin") == p.sha


def test_relative_megatron_lm_git_is_relative_to_cwd(bare_proj):
    p = bare_proj
    write_pin(p.root, str(p.tmp / "no-such-repo"), p.sha)
    p.ok("upstream", env={"MEGATRON_LM_GIT": "upstream"}, cwd=p.tmp)
    assert cache_has(p.cache, p.sha)


def test_unknown_sha_names_variable_and_sha(bare_proj):
    p = bare_proj
    bogus = "0123456789abcdef" * 2 + "01234567"
    write_pin(p.root, str(p.upstream), bogus)
    proc = p.fails("upstream", env={"MEGATRON_LM_GIT": str(p.upstream)})
    assert "MEGATRON_LM_GIT" in proc.stderr
    assert bogus in proc.stderr
    assert not cache_has(p.cache, bogus)


def test_no_source_at_all(bare_proj):
    p = bare_proj
    write_pin(p.root, str(p.tmp / "no-such-repo"), p.sha)
    proc = p.fails("upstream")
    assert "MEGATRON_LM_GIT" in proc.stderr and p.sha in proc.stderr
    proc = p.fails("apply")
    assert "MEGATRON_LM_GIT" in proc.stderr
    assert not p.build.exists()


def test_cache_seeded_by_git_clone_bare(bare_proj):
    """A cache made with `git clone --bare` (no falcon-mcore refs) is usable as it is."""
    p = bare_proj
    git(p.tmp, "clone", "-q", "--bare", str(p.upstream), str(p.cache))
    shutil.rmtree(p.upstream)
    p.ok("upstream")
    p.ok("apply")
    assert git(p.build, "rev-parse", "refs/falcon-mcore/pin") == p.sha


def test_bad_upstream_file(proj):
    (proj.root / "UPSTREAM").write_text("url = x\ntag = y\nsha = abc\n")
    proc = proj.fails("upstream")
    assert "40-hex" in proc.stderr
    (proj.root / "UPSTREAM").write_text("url = x\nsha = " + proj.sha + "\n")
    proc = proj.fails("upstream")
    assert "missing tag" in proc.stderr
