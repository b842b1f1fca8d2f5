# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Trains a model with ``pretrain_hybrid.py`` on the CPU and counts, for every iteration, the
host reads of tensor values (``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``, ...).

On a GPU each such read waits for every kernel queued so far: the GPU then idles while the host
works until it launches the next kernel, and the host cannot queue the next step ahead. Usage
(from the tree's root)::

    python -m tests.unit_tests.training.host_reads_worker [--cuda] OUT_JSON -- <pretrain flags>

OUT_JSON gets ``{iteration: {innermost Megatron frame: reads}}``; each read is charged to the
iteration whose ``train_step`` ran last (a read in ``training_log`` counts for the step it logs).

* On the CPU the reads are counted with a ``TorchDispatchMode`` from the first ``train_step`` on.
  Without Transformer Engine or Apex upstream's gradient clipping falls back to kernels that read
  the norm (``local_multi_tensor_l2_norm``) or need a float (no tensor-scale kernel); the worker
  swaps in tensor-only stand-ins, so that clipping takes the path it takes on a GPU with either.
* With ``--cuda`` (on a GPU, CUDA graphs allowed) PyTorch's own detector counts instead:
  ``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising operation (reads,
  copies from pageable memory, ...; not at an explicit ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result the host needs: on a GPU each one synchronises with the device.
HOST_READS = {
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.nonzero.default",
}


class HostReadCounter(TorchDispatchMode):
    """Counts host reads per iteration, keyed by the innermost Megatron frame of each."""

    def __init__(self):
        super().__init__()
        self.iteration = None
        self.reads = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.iteration is not None and str(func) in HOST_READS:
            frames = [
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()
                if "/megatron/" in f.filename
            ]
            self.reads[self.iteration][frames[-1] if frames else "?"] += 1
        return func(*args, **(kwargs or {}))


def _l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Stand-in for TE's / Apex's multi_tensor_l2norm: the norm stays a tensor."""
    norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]])
    return torch.linalg.vector_norm(norms).reshape(1), None


def _scale_by_tensor(chunk_size, noop_flag, tensor_lists, scale):
    """Stand-in for TE's multi_tensor_scale_tensor: the scale is a tensor."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        dst.copy_(src * scale)


class SyncWarningCounter:
    """Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` per iteration, keyed by
    the Python line that caused each."""

    def __init__(self):
        self.iteration = None
        self.reads = defaultdict(Counter)
        self._records = []
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self):
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def charge(self):
        """Charge the warnings recorded since the last call to the current iteration."""
        for record in self._records:
            if "synchronizing" in str(record.message):
                where = f"{Path(record.filename).name}:{record.lineno}"
                self.reads[self.iteration][where] += 1
        self._records.clear()

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self.charge()
        self._catch.__exit__(*exc)


def main(out: str, flags: list[str], cuda: bool) -> None:
    """Train with ``flags`` and write the reads per iteration to ``out``."""
    from megatron.core.optimizer import clip_grads
    from megatron.training import training

    if cuda:
        counter = SyncWarningCounter()
    else:
        clip_grads.l2_norm_impl = _l2_norm
        clip_grads.multi_tensor_scale_tensor_impl = _scale_by_tensor
        counter = HostReadCounter()
    train_step = training.train_step
    started = []

    def counted_train_step(*args, **kwargs):
        if not started:
            counter.__enter__()
            started.append(True)
        elif cuda:
            counter.charge()
        counter.iteration = kwargs["iteration"]
        return train_step(*args, **kwargs)

    training.train_step = counted_train_step
    sys.argv = ["pretrain_hybrid.py", *flags]
    try:
        runpy.run_path("pretrain_hybrid.py", run_name="__main__")
    finally:
        if started:
            counter.__exit__(None, None, None)
    reads = {str(k): dict(v) for k, v in sorted(counter.reads.items())}
    Path(out).write_text(json.dumps(reads, indent=1) + "\n")


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


if __name__ == "__main__":
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = _free_port()
    separator = sys.argv.index("--")
    options = sys.argv[1:separator]
    on_cuda = "--cuda" in options
    main([o for o in options if o != "--cuda"][0], sys.argv[separator + 1 :], on_cuda)
