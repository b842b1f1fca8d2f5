# Copyright (c) 2026, falcon-mcore authors. All rights reserved.
"""Test setup for megatron.core.bitnet.

* Makes ``megatron.core.bitnet`` importable when it is not already: from the patched tree
  (``build/Megatron-LM`` or ``$FALCON_MCORE_BUILD``) if present, else by a sys.path insert of
  ``<repo>/megatron_overlay``.
* On machines without CUDA, sets ``TRITON_INTERPRET=1`` (if unset, and if triton has not been
  imported yet) so the kernels can be checked with Triton's CPU interpreter.  Triton decides
  compiled vs interpreted when it and each kernel are first imported and consults the variable
  again later, so it cannot be scoped to one import: it stays set for the rest of this
  (CPU-only) pytest process, where compiled Triton kernels could not run anyway.
* Puts this directory on ``sys.path`` for the tests' helper modules (pytest runs with
  ``--import-mode=importlib``, which does not).
* Registers the ``gpu`` marker for tests that need a CUDA device.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

# Must happen before anything imports triton (importing megatron.core may).  If triton was
# already imported (by another test directory) without the interpreter, turning it on now
# would leave Triton half compiled / half interpreted; then the kernel tests skip with a hint.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO = Path(__file__).resolve().parents[3]
_OVERLAY = _REPO / "megatron_overlay"
# The patched tree that tests/conftest.py puts on sys.path for Megatron-level tests.
_BUILD = Path(os.environ.get("FALCON_MCORE_BUILD", _REPO / "build" / "Megatron-LM"))


def _try_import() -> bool:
    try:
        importlib.import_module("megatron.core.bitnet")
        return True
    except ImportError:
        return False


def _ensure_bitnet_importable() -> None:
    """Import megatron.core.bitnet: as is, else from the patched tree, else from the overlay.

    The patched tree is preferred so that ``megatron`` stays the real package for other tests
    in the same session; the overlay (where ``megatron`` is only a namespace package) is the
    fallback when no patched tree exists.
    """
    if _try_import():
        return
    if (_BUILD / "megatron" / "core").is_dir() and "megatron" not in sys.modules:
        if str(_BUILD) not in sys.path:
            sys.path.insert(0, str(_BUILD))
        importlib.invalidate_caches()
        if _try_import():
            return
    sys.path.insert(0, str(_OVERLAY))
    # ``megatron`` may already be imported (upstream tree without our overlay): extend its path.
    for name, sub in (("megatron", "megatron"), ("megatron.core", "megatron/core")):
        mod = sys.modules.get(name)
        if (
            mod is not None
            and hasattr(mod, "__path__")
            and str(_OVERLAY / sub) not in list(mod.__path__)
        ):
            mod.__path__.append(str(_OVERLAY / sub))
    importlib.invalidate_caches()
    importlib.import_module("megatron.core.bitnet")


_ensure_bitnet_importable()

# Helper modules of these tests (bitnet_layer_helpers, bitnet_tp_worker) are imported by plain
# name, also by the processes the tensor-parallel tests spawn (they inherit sys.path).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: test needs a CUDA GPU (skipped without one)")
