"""scripts/lib/triton_configs.py: every autotuner of a kernel package (also one wrapped by
triton.heuristics) keeps exactly its smallest-tile configuration. CPU: decorating kernels needs
no GPU; nothing is compiled."""

from __future__ import annotations

import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
import triton_configs  # noqa: E402  (scripts/lib, on sys.path through conftest)

KERNELS = '''
import triton
import triton.language as tl


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=2, num_warps=4),
    ],
    key=["n"],
)
@triton.jit
def tuned(x_ptr, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pass


@triton.heuristics({"EVEN": lambda args: args["n"] % 2 == 0})
@triton.autotune(configs=[triton.Config({"B": 64}), triton.Config({"B": 16})], key=["n"])
@triton.jit
def wrapped(x_ptr, n, B: tl.constexpr, EVEN: tl.constexpr):
    pass
'''


def test_smallest_config_kept(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_kernels_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text(textwrap.dedent(KERNELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        # imports the package's modules itself (ops is not imported by __init__)
        assert triton_configs.keep_smallest_config("fake_kernels_pkg") == {
            "autotuners": 2, "configs_dropped": 3
        }
        ops = sys.modules["fake_kernels_pkg.ops"]
        (kept,) = ops.tuned.configs
        # 64 x 32 and 32 x 64 tie on tile size: fewer stages wins
        assert kept.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32} and kept.num_stages == 2
        (kept,) = ops.wrapped.fn.configs
        assert kept.kwargs == {"B": 16}
        # idempotent: nothing left to drop
        assert triton_configs.keep_smallest_config("fake_kernels_pkg")["configs_dropped"] == 0
    finally:
        for name in [n for n in sys.modules if n.startswith("fake_kernels_pkg")]:
            del sys.modules[name]
