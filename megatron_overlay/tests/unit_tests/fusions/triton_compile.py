# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU, in a fresh process.

The CPU tests run the fusions' kernels in Triton's interpreter, which accepts programs that
compiled Triton rejects (e.g. integer widths in bit casts). ``compiles_for_hopper`` compiles
kernels to machine code with Triton's bundled ptxas: the interpreter must be off, and it is
fixed when triton is first imported, hence the subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import megatron.core

# Run in the subprocess: compile every (kernel, signature, constexprs) of COMPILE_CASES, which
# the caller's script defines after this header.
_HEADER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_hopper(kernel, signature, constexprs, **options):
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], (kernel.__name__, signature, constexprs)
    return compiled
"""


def assert_compiles_for_hopper(script: str) -> None:
    """Run ``script`` (which calls ``compile_for_hopper(kernel, signature, constexprs)``) in a
    process without ``TRITON_INTERPRET``; fail with its error output unless it prints
    ``COMPILED``. Skipped where Triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(megatron.core.__file__).resolve().parents[2])  # holds megatron/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _HEADER + script + "\nprint('COMPILED')\n"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stderr[-3000:]
