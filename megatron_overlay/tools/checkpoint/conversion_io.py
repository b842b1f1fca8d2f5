# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Checkpoint I/O shared by the HF <-> Megatron checkpoint tools of this directory.

Model-independent: the Falcon-H1 converter (``falcon_h1_conversion.py``) and the BitNet exporter
(``bitnet_hf_export.py``) read and write checkpoints through these classes and functions only.

* HF side: :class:`HFReader` (lazy safetensors, single file or sharded with an index) and
  :class:`SafetensorsWriter` (shards of a maximum size plus an index).
* Megatron side: :func:`open_megatron_checkpoint` resolves the step a checkpoint directory's
  tracker names and returns a :class:`LegacyReader` (per-rank ``torch`` files, memory-mapped)
  or a :class:`TorchDistReader` (global tensors of a ``torch_dist`` checkpoint, read per key).
* Output: :func:`atomic_output_dir` (nothing is half-written, nothing a user had is replaced
  without ``--force``) and :func:`run_tool` (a :class:`ConversionError` becomes a message and
  exit status 2).

A missing, truncated or corrupt input file is a :class:`ConversionError` that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

Shapes = Union[Mapping[str, Optional[Sequence[int]]], Iterable[str]]


class ConversionError(ValueError):
    """A checkpoint or configuration this converter cannot convert exactly."""


# --------------------------------------------------------------------------------------------
# Messages, arguments, the command-line wrapper
# --------------------------------------------------------------------------------------------


def logger(tool: str) -> Callable[[str], None]:
    """A function printing ``[tool] message`` lines to stderr."""

    def log(msg: str) -> None:
        print(f"[{tool}] {msg}", file=sys.stderr, flush=True)

    return log


def run_tool(action: Callable[[object], None], opts, log: Callable[[str], None]) -> int:
    """Run ``action(opts)``; a :class:`ConversionError` is logged (with the assurance that
    ``--save-dir`` is untouched) and gives exit status 2, success 0."""
    try:
        action(opts)
    except ConversionError as exc:
        log(f"error: {exc}")
        log(f"nothing was written (--save-dir {opts.save_dir} is as it was)")
        return 2
    return 0


def short_list(names: Sequence[str], n: int = 6) -> str:
    """The first ``n`` of ``names``, and how many more there are."""
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def gib(nbytes: int) -> str:
    """``nbytes`` in GiB, for messages."""
    return f"{nbytes / 2**30:.2f} GiB"


def arg_value(args, name: str, default=None):
    """``args.<name>``, or ``default`` when it is absent or None."""
    value = getattr(args, name, default)
    return default if value is None else value


def arg_mismatches(args, expected: Iterable[tuple], needs: str) -> List[str]:
    """``name=value (<needs> wanted)`` for each ``(name, wanted[, default])`` of ``expected``
    whose value in ``args`` (``default`` when absent) is not ``wanted``."""
    problems = []
    for name, wanted, *default in expected:
        value = getattr(args, name, *(default or [None]))
        if value != wanted:
            problems.append(f"{name}={value!r} ({needs} {wanted!r})")
    return problems


def check_tensors(where: str, have: Shapes, expected: Shapes, implied: str = "expected") -> None:
    """Raise :class:`ConversionError` (``where: problems``) unless the tensors ``have`` are
    exactly those ``expected``.

    Both are tensor names, or mappings of name -> shape (a shape of None: any shape). The
    missing names are listed in ``expected``'s order, the unexpected ones sorted, then the
    tensors whose shape differs (``<name> has shape <s>, <implied> <shape>``). Entries that are
    not model tensors are ignored: ``._extra_state`` and sharded-object pieces (names with /).
    """
    have = have if isinstance(have, Mapping) else dict.fromkeys(have)
    expected = expected if isinstance(expected, Mapping) else dict.fromkeys(expected)
    have = {k: v for k, v in have.items() if not k.endswith("._extra_state") and "/" not in k}
    missing = [k for k in expected if k not in have]
    unexpected = sorted(k for k in have if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {short_list(unexpected)}")
    for key, shape in expected.items():
        if shape is None or have.get(key) is None or tuple(have[key]) == tuple(shape):
            continue
        problems.append(f"{key} has shape {tuple(have[key])}, {implied} {tuple(shape)}")
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))


def merge_replicated(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """A tensor every TP rank holds whole (norms): all copies must be equal."""
    for r, s in enumerate(shards[1:], start=1):
        if not torch.equal(shards[0], s):
            raise ConversionError(f"{name} differs between TP rank 0 and TP rank {r}")
    return shards[0]


class Progress:
    """A tqdm progress bar over layers (stderr), or nothing when disabled or tqdm is missing."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
            except ImportError:
                pass

    def update(self) -> None:
        """One more layer done."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(save_dir: Path, force: bool, inputs: Sequence[Path]) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``save_dir`` when the block succeeds.

    Refuses a non-empty ``save_dir`` unless ``force``, and any ``save_dir`` that overlaps an
    input directory. On failure the temporary directory is removed and ``save_dir`` untouched.
    """
    save_dir = save_dir.resolve()
    for src in inputs:
        src = src.resolve()
        if save_dir == src or src in save_dir.parents or save_dir in src.parents:
            raise ConversionError(f"--save-dir {save_dir} overlaps the input {src}")
    if save_dir.exists():
        if not save_dir.is_dir():
            raise ConversionError(f"--save-dir {save_dir} exists and is not a directory")
        if any(save_dir.iterdir()) and not force:
            raise ConversionError(
                f"--save-dir {save_dir} exists and is not empty; pass --force to replace it"
            )
    created = [p for p in [save_dir.parent, *save_dir.parent.parents] if not p.exists()]
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        yield tmp
        old = None
        if save_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.old-", dir=save_dir.parent))
            os.rename(save_dir, old / "replaced")
        os.rename(tmp, save_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first; only the empty directories made above
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


# --------------------------------------------------------------------------------------------
# HF safetensors
# --------------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``; an unreadable or malformed file is a
    :class:`ConversionError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


class HFReader:
    """Lazy reader of an HF safetensors checkpoint (single file or sharded with an index).

    A missing, truncated or corrupt file (config.json, the index, a shard) is a
    :class:`ConversionError` that names the file, raised here, before anything is written:
    safetensors checks at open that a file's header is valid and its tensors cover the file.
    """

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self._files: Dict[str, object] = {}
        self._where: Dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        try:
            self._open(hf_dir)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, hf_dir: Path) -> None:
        config_path = hf_dir / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} not found")
        self.config = read_json_object(config_path)
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ConversionError(f"{index} has no weight_map of tensor name -> file name")
        elif single.is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if len(found) != 1:
                raise ConversionError(
                    f"{hf_dir} has neither model.safetensors.index.json nor model.safetensors"
                    + (f" (found {found})" if found else "")
                )
            single = hf_dir / found[0]
            weight_map = None
        if weight_map is None:
            handle = self._open_file(single)
            self._where = {k: single.name for k in handle.keys()}
        else:
            for name in sorted(set(weight_map.values())):
                path = hf_dir / name
                if not path.is_file():
                    raise ConversionError(f"{index} lists {name}, which is missing ({path})")
                self._open_file(path)
            for key, name in weight_map.items():
                if key not in self._files[name].keys():
                    raise ConversionError(f"index maps {key} to {name}, which does not hold it")
                self._where[key] = name
            for name, handle in self._files.items():
                extra = [k for k in handle.keys() if k not in weight_map]
                if extra:
                    raise ConversionError(f"{name} holds tensors the index omits: {extra[:5]}")

    def _open_file(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
        except (SafetensorError, OSError) as exc:
            raise ConversionError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
        self._files[path.name] = handle
        return handle

    def close(self) -> None:
        """Close the files."""
        self._stack.close()

    def names(self) -> List[str]:
        """Names of all tensors."""
        return list(self._where)

    def shape(self, name: str) -> tuple:
        """Shape of tensor ``name`` (without reading it)."""
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name`` (without reading it)."""
        code = self._files[self._where[name]].get_slice(name).get_dtype()
        if code not in _ST_DTYPES:
            raise ConversionError(f"{name} has unsupported dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Tensor ``name``, cast to ``dtype`` if given."""
        t = self._files[self._where[name]].get_tensor(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def check(self, expected: Mapping[str, Sequence[int]]) -> None:
        """Every expected tensor (name -> shape, from config.json) present with its shape, and
        nothing else."""
        have = {k: self.shape(k) for k in self._where}
        check_tensors(
            f"{self.hf_dir} does not match its config.json", have, expected, "config implies"
        )


class SafetensorsWriter:
    """Writes tensors to HF safetensors shards of at most ``max_shard_bytes`` (plus an index
    when there is more than one shard)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` as ``name``; a full shard is written first."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self.shards)
        save_file(self.pending, str(self.out_dir / f".shard-{index}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, name the shards and write the index."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.rename(self.out_dir / ".shard-0", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self.out_dir / f".shard-{i}", self.out_dir / fname)
            weight_map.update({k: fname for k in names})
        with open(self.out_dir / "model.safetensors.index.json", "w") as f:
            json.dump(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                f,
                indent=2,
            )


# --------------------------------------------------------------------------------------------
# Megatron checkpoints
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_tolerant_megatron():
    """Let Megatron's argument validation and dist-checkpoint I/O run on a machine without CUDA.

    On such a machine a few CUDA calls on these paths have no effect to keep (stream syncs, a
    device for a one-element status tensor, a device-generation query for a warning), so they
    are replaced for the duration of the block. With CUDA present nothing is changed.
    """
    if torch.cuda.is_available():
        yield
        return
    import megatron.training.arguments as margs_module

    saved = (
        torch.cuda.synchronize,
        torch.cuda.current_device,
        getattr(margs_module, "get_device_arch_version", None),
    )
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    if saved[2] is not None:
        margs_module.get_device_arch_version = lambda: 0
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved[0], saved[1]
        if saved[2] is not None:
            margs_module.get_device_arch_version = saved[2]


def checkpoint_file(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    """File of one rank in Megatron's legacy per-rank ``torch`` format."""
    sub = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / sub / "model_optim_rng.pt"


def resolve_checkpoint_dir(load_dir: Path) -> Path:
    """The step directory of a Megatron checkpoint: the one its tracker file names, or
    ``load_dir`` itself when it is a step directory."""
    tracker = load_dir / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        path = load_dir / sub
        if not path.is_dir():
            raise ConversionError(f"{tracker} points at {sub}, which does not exist")
        return path
    if (load_dir / "metadata.json").is_file() or any(load_dir.glob("mp_rank_*")):
        return load_dir
    raise ConversionError(f"{load_dir} is not a Megatron checkpoint (no {TRACKER})")


def open_megatron_checkpoint(load_dir: Path) -> Union["LegacyReader", "TorchDistReader"]:
    """A reader of the checkpoint step ``load_dir`` holds (see :func:`resolve_checkpoint_dir`),
    by its format: ``torch_dist`` or the legacy per-rank ``torch``."""
    ckpt_dir = resolve_checkpoint_dir(load_dir)
    if (ckpt_dir / "metadata.json").is_file():
        return TorchDistReader(ckpt_dir)
    return LegacyReader(ckpt_dir)


class LegacyReader:
    """Reads the per-rank files of a legacy ``torch`` checkpoint, memory-mapped.

    ``models[(tp_rank, pp_rank)]`` is each rank's model state dict.
    """

    is_dist = False

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = ckpt_dir
        subdirs = sorted(p.name for p in ckpt_dir.glob("mp_rank_*") if p.is_dir())
        if not subdirs:
            raise ConversionError(f"{ckpt_dir} holds no mp_rank_* directories")
        first = ckpt_dir / subdirs[0] / "model_optim_rng.pt"
        state = self._load(first)
        self.args = state["args"]
        self.tp = int(getattr(self.args, "tensor_model_parallel_size", 1))
        self.pp = int(getattr(self.args, "pipeline_model_parallel_size", 1))
        expected = sorted(
            checkpoint_file(ckpt_dir, r, s, self.pp).parent.name
            for r in range(self.tp)
            for s in range(self.pp)
        )
        if subdirs != expected:
            raise ConversionError(
                f"{ckpt_dir} holds rank directories {subdirs}, but its args say TP={self.tp} "
                f"PP={self.pp} (expected {expected}; expert parallelism is not supported)"
            )
        self.models: Dict[tuple, dict] = {}
        for r in range(self.tp):
            for s in range(self.pp):
                st = self._load(checkpoint_file(ckpt_dir, r, s, self.pp))
                if "model" not in st:
                    raise ConversionError(
                        "checkpoint without a 'model' entry (virtual pipeline checkpoints with "
                        "model0, model1, ... are not supported)"
                    )
                self.models[(r, s)] = st["model"]

    @staticmethod
    def _load(path: Path) -> dict:
        if not path.is_file():
            raise ConversionError(f"{path} not found")
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # files written with the old (non-zip) serialization
            pass
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated / corrupt: torch raises several kinds
            raise ConversionError(
                f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {exc!r}"
            ) from exc

    def check(self, expected: Callable[[int], Iterable[str]]) -> None:
        """Every rank of pipeline stage ``s`` holds exactly the tensors ``expected(s)``."""
        for (r, s), model in self.models.items():
            check_tensors(f"rank TP={r} PP={s}", list(model), list(expected(s)))

    def shards(self, name: str, stage: int) -> List[torch.Tensor]:
        """Tensor ``name`` of pipeline stage ``stage``, one per TP rank."""
        return [self.models[(r, stage)][name] for r in range(self.tp)]


def _dcp_error(exc: BaseException) -> str:
    """The errors behind a PyTorch DCP ``CheckpointException`` (its str is a traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(repr(pair[0]) for pair in failures.values())
    return repr(exc)


class TorchDistReader:
    """Reads global tensors of a ``torch_dist`` checkpoint one layer at a time (PyTorch DCP)."""

    is_dist = True

    def __init__(self, ckpt_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron.core import dist_checkpointing

        self.ckpt_dir = ckpt_dir
        try:
            with cpu_tolerant_megatron():
                state = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
            meta = FileSystemReader(str(ckpt_dir)).read_metadata()
        except (Exception, CheckpointException) as exc:  # truncated / corrupt files
            raise ConversionError(
                f"cannot read the torch_dist checkpoint {ckpt_dir} (truncated or corrupt?): "
                f"{_dcp_error(exc)}"
            ) from exc
        self.args = state.get("args")
        if self.args is None:
            raise ConversionError(f"{ckpt_dir} records no Megatron args (common state)")
        # Model tensors; optimizer state ("optimizer.state...", "optimizer.distributed...",
        # "chained_N.optimizer...") and byte objects (RNG, extra states) are not converted.
        self.tensors = {
            k: v
            for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
            and not re.match(r"(chained_\d+\.)?optimizer\.", k)
        }

    def shape(self, name: str) -> tuple:
        """Global shape of tensor ``name``."""
        return tuple(self.tensors[name].size)

    def check(self, expected: Mapping[str, Optional[Sequence[int]]]) -> None:
        """The checkpoint holds exactly the tensors ``expected`` (name -> global shape)."""
        have = {k: self.shape(k) for k in self.tensors}
        check_tensors(str(self.ckpt_dir), have, expected)

    def read(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The tensors ``keys``, read whole."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.api import CheckpointException

        state = {
            k: torch.empty(tuple(self.tensors[k].size), dtype=self.tensors[k].properties.dtype)
            for k in keys
        }
        try:
            dcp_load(state, storage_reader=FileSystemReader(str(self.ckpt_dir)), no_dist=True)
        except (Exception, CheckpointException) as exc:  # a truncated / corrupt *.distcp
            raise ConversionError(
                f"cannot read the torch_dist checkpoint {self.ckpt_dir} (truncated or corrupt?) "
                f"for {short_list(list(keys), 3)}: {_dcp_error(exc)}"
            ) from exc
        return state
