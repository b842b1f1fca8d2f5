"""Environment for the CPU (gloo) rank processes of the multi-rank unit tests."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Dict, Iterator, Optional, Sequence


@contextlib.contextmanager
def forkserver_env(preload: Sequence[str], paths: Sequence[str]) -> Iterator[None]:
    """Preload ``preload`` in the fork server and set the environment it starts with.

    * ``PYTHONPATH`` = ``paths``: Python 3.12's fork server ignores the ``sys.path`` it is sent.
    * ``CUDA_VISIBLE_DEVICES=""``: these cases are the CPU tier (gloo, CPU tensors).  On a GPU
      host a preloaded Megatron module can initialise CUDA inside the server, and every rank
      forked from it then fails ("Cannot re-initialize CUDA in forked subprocess"); with the
      devices hidden the ranks run exactly the CPU code path that CI runs.

    The previous values are restored on exit.  A fork server that is already running keeps the
    environment it started with (every caller in the tests goes through this function).
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    new = {
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "CUDA_VISIBLE_DEVICES": "",
    }
    saved: Dict[str, Optional[str]] = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
