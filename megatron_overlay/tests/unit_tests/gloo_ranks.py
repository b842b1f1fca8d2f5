# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Start the CPU (gloo) rank processes of multi-rank unit tests from a fork server."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Dict, Iterator, Optional, Sequence


@contextlib.contextmanager
def forkserver_env(preload: Sequence[str], paths: Sequence[str]) -> Iterator[None]:
    """Preload the modules ``preload`` in the fork server, started with this environment:

    * ``PYTHONPATH`` = ``paths`` (Python 3.12's fork server does not use the ``sys.path`` it
      is sent);
    * ``CUDA_VISIBLE_DEVICES=""``: the ranks compute on CPU tensors over gloo.  On a GPU host a
      preloaded module could initialise CUDA inside the server, and every rank forked from it
      would then fail ("Cannot re-initialize CUDA in forked subprocess").

    Both variables get their previous values back on exit.  A fork server that is already
    running keeps the environment it was started with.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    new = {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "CUDA_VISIBLE_DEVICES": ""}
    saved: Dict[str, Optional[str]] = {key: os.environ.get(key) for key in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
