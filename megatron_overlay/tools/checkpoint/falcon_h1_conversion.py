#!/usr/bin/env python3
# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Convert Falcon-H1 checkpoints between HF transformers and Megatron, at any TP / PP, exactly.

HF -> Megatron (``torch_dist`` by default, or the legacy per-rank ``torch`` format)::

    python tools/checkpoint/falcon_h1_conversion.py hf-to-megatron \\
        --hf-dir /models/Falcon-H1-0.5B-Base --save-dir /ckpt/falcon-h1-0.5b \\
        --target-tp 1 --target-pp 2 [--ckpt-format torch_dist|torch] [--force]

    # then, with no model flags (add --ckpt-format torch for the legacy format, and the
    # precision, data and optimizer flags of the run):
    torchrun ... pretrain_mamba.py --load /ckpt/falcon-h1-0.5b --use-checkpoint-args \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --bf16 ...

Megatron -> HF (either format, any TP / PP; ``FalconH1ForCausalLM.from_pretrained`` loads the
result)::

    python tools/checkpoint/falcon_h1_conversion.py megatron-to-hf \\
        --load-dir /ckpt/falcon-h1-0.5b --save-dir /models/out [--dtype bf16|fp32] [--force]

Guarantees and limits:

* Exact: tensors are only sliced, concatenated and zero-padded (the vocabulary, to Megatron's
  padded size), never recomputed, so HF -> Megatron -> HF returns bit-identical tensors and
  the same config.json (model keys the source omitted are written out explicitly). Dtypes are
  kept unless ``--dtype`` asks for a cast.
* The checkpoint args are Megatron's own ``parse_args`` + ``validate_args`` of the model flags
  (the 14 multipliers included), plus the padded vocabulary, the tokenizer (``--hf-dir`` when
  it holds one) and the source config.json, so ``--use-checkpoint-args`` needs no model flags.
  They include ``--unpadded-vocab-size`` (HF's ``vocab_size``): the padding rows Megatron adds
  to the output layer (zeros) are masked out of the softmax, so losses equal HF's.
  One model flag Megatron's ``--use-checkpoint-args`` does not restore: ``--norm-epsilon``
  (default 1e-5, as in every Falcon-H1 release; the converter warns when it differs).
* The checkpoint is a ``release`` checkpoint (iteration 0, no optimizer or RNG state).
* ``torch_dist`` stores global tensors: the checkpoint loads at any TP the model allows (see
  below) provided the padded vocabulary matches (``--make-vocab-size-divisible-by`` times TP);
  the recorded hybrid layer pattern carries ``|`` pipeline splits for the requested PP,
  override it with ``--hybrid-layer-pattern`` to load at another PP.
* TP must divide the attention heads, Mamba heads and the FFN size, and divide or be a
  multiple of the KV heads and the Mamba groups (Falcon-H1 releases have one group: ranks
  beyond it share the group's B / C rows, split evenly, so ``mamba_d_state`` must split evenly
  over them).
* Output is written to a temporary directory next to ``--save-dir`` and renamed into place;
  an existing ``--save-dir`` is only replaced with ``--force``. On any error nothing is
  written; a missing, truncated or corrupt input file (config.json, the safetensors index, a
  shard, a Megatron checkpoint file) is an error that names it.
* BitNet checkpoints (``--use-bitnet``) are refused: their forward pass quantises weights and
  activations, so as a dense FalconH1 their latent weights would compute another model; export
  them with ``tools/checkpoint/bitnet_hf_export.py``. Quantized HF checkpoints are refused too.
* Memory: safetensors are read lazily, one layer at a time. Peak host memory when writing is
  about one pipeline stage of the model (legacy ``torch``: all TP shards of a stage are held
  until that stage's files are written) or the whole model (``torch_dist``: Megatron's saver
  writes one state dict), plus one layer; megatron-to-hf holds one layer plus one output
  shard (``--max-shard-size``), reading legacy files memory-mapped and ``torch_dist`` tensors
  per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent  # the Megatron tree
for _p in (str(_HERE), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import falcon_h1_mapping as fm  # noqa: E402
from falcon_h1_mapping import ConversionError  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


def _log(msg: str) -> None:
    print(f"[falcon-h1-convert] {msg}", file=sys.stderr, flush=True)


class _Progress:
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
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


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
# HF side
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
        self._stack.close()

    def names(self) -> List[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple:
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._files[self._where[name]].get_slice(name).get_dtype()
        if code not in _ST_DTYPES:
            raise ConversionError(f"{name} has unsupported dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self._files[self._where[name]].get_tensor(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def check(self, dims: fm.FalconH1Dims) -> None:
        """Every expected tensor present with its shape, and nothing else."""
        expected = fm.hf_shapes(dims)
        have = set(self._where)
        missing = [k for k in expected if k not in have]
        unexpected = sorted(k for k in have if k not in expected)
        problems = []
        if missing:
            problems.append(f"missing tensor(s): {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected tensor(s): {_short(unexpected)}")
        for key, shape in expected.items():
            if key in have and self.shape(key) != shape:
                problems.append(f"{key} has shape {self.shape(key)}, config implies {shape}")
        if problems:
            raise ConversionError(
                f"{self.hf_dir} does not match its config.json: " + "; ".join(problems)
            )


def _short(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


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
# Megatron arguments
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_tolerant_megatron():
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


def build_megatron_args(flags: List[str], world_size: int):
    """Megatron's own ``parse_args`` + ``validate_args`` on ``flags`` (output captured)."""
    from megatron.training.arguments import parse_args, validate_args

    saved_argv = sys.argv
    saved_env = {
        k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "CUDA_DEVICE_MAX_CONNECTIONS")
    }
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    sys.argv = ["pretrain_mamba.py"] + flags
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), _cpu_tolerant_megatron():
            args = parse_args()
            validate_args(args)
    except (SystemExit, AssertionError, ValueError) as exc:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise ConversionError(f"Megatron rejected the model arguments {flags}: {exc!r}") from exc
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return args


def _dtype_flag(dtype: torch.dtype) -> List[str]:
    return {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])


# --------------------------------------------------------------------------------------------
# HF -> Megatron
# --------------------------------------------------------------------------------------------


def _hf_layer(reader: HFReader, dims: fm.FalconH1Dims, i: int, dtype) -> Dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k: reader.get(prefix + k, dtype) for k in fm.hf_layer_keys(dims)}


def _checkpoint_name(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    sub = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / sub / "model_optim_rng.pt"


def _write_legacy(reader, dims, args, tp, counts, padded, dtype, out: Path, progress) -> None:
    """Megatron's legacy per-rank format: release/mp_rank_TT[_PPP]/model_optim_rng.pt."""
    pp = len(counts)
    offsets = fm.stage_offsets(counts)
    release = out / "release"
    bar = _Progress(dims.num_layers, "hf-to-megatron (torch)", progress)
    for s in range(pp):
        ranks: List[Dict[str, object]] = [{} for _ in range(tp)]
        if s == 0:
            for r, shard in enumerate(
                fm.hf_vocab_to_megatron(reader.get(fm.HF_EMBED, dtype), padded, tp)
            ):
                ranks[r][fm.MG_EMBED] = shard
        for local in range(counts[s]):
            i = offsets[s] + local
            shards = fm.hf_layer_to_megatron(_hf_layer(reader, dims, i, dtype), dims, tp)
            prefix = f"decoder.layers.{local}."
            for r in range(tp):
                for name, t in shards[r].items():
                    ranks[r][prefix + name] = t
                for name in fm.MG_LAYER_EXTRA_STATES:
                    ranks[r][prefix + name] = None
            bar.update()
        if s == pp - 1:
            norm = reader.get(fm.HF_FINAL_NORM, dtype)
            head = fm.hf_vocab_to_megatron(reader.get(fm.HF_LM_HEAD, dtype), padded, tp)
            for r in range(tp):
                ranks[r][fm.MG_FINAL_NORM] = norm
                ranks[r][fm.MG_OUTPUT] = head[r]
                ranks[r][fm.MG_OUTPUT_EXTRA_STATE] = None
        for r in range(tp):
            path = _checkpoint_name(release, r, s, pp)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "args": args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": 0,
                "model": ranks[r],
                "num_floating_point_operations_so_far": 0,
            }
            torch.save(state, path)
            ranks[r] = {}
    bar.close()


@contextlib.contextmanager
def _single_rank_megatron():
    """A one-process gloo group with Megatron's model-parallel state at TP = PP = 1."""
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = False
    tmp = None
    if not dist.is_initialized():
        tmp = tempfile.mkdtemp(prefix="falcon-h1-convert-")
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", world_size=1, rank=0)
        created = True
    if dist.get_world_size() != 1:
        raise ConversionError("run the converter as a single process (not under torchrun)")
    # Called from a process that already set up TP = PP = 1 (a library user, a test): reuse it.
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if owns_state:
            parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
            shutil.rmtree(tmp, ignore_errors=True)


def _write_torch_dist(reader, dims, args, padded, dtype, out: Path, progress) -> None:
    """Megatron's torch_dist format, saved by Megatron's dist_checkpointing from one process.

    torch_dist stores global tensors (Mamba in_proj / conv1d per component, fc1 as gate/up), so
    a single-process TP = PP = 1 save loads at any TP / PP.
    """
    import copy

    from hybrid_builders import hybrid_builder
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.training import checkpointing as mcp

    with _single_rank_megatron():
        build_args = copy.copy(args)
        build_args.tensor_model_parallel_size = 1
        build_args.pipeline_model_parallel_size = 1
        build_args.hybrid_layer_pattern = args.hybrid_layer_pattern.replace("|", "")
        build_args.use_cpu_initialization = True
        build_args.perform_initialization = False
        build_args.transformer_impl = "local"
        for fusion in (  # kernels that do not change the state dict and may be unavailable
            "apply_rope_fusion",
            "gradient_accumulation_fusion",
            "masked_softmax_fusion",
            "bias_activation_fusion",
            "bias_dropout_fusion",
        ):
            setattr(build_args, fusion, False)
        build_args.no_persist_layer_norm = True
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            model = hybrid_builder(build_args, pre_process=True, post_process=True)
        params = dict(model.named_parameters())

        def assign(name: str, tensor: torch.Tensor) -> None:
            param = params.pop(name, None)
            if param is None:
                raise ConversionError(f"the Megatron model has no parameter {name}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ConversionError(
                    f"{name}: converted shape {tuple(tensor.shape)} != model {tuple(param.shape)}"
                )
            # The model was built on the meta device: put a real parameter in its place, with
            # the attributes Megatron set on the original (tensor_model_parallel, ...).
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            new = torch.nn.Parameter(tensor, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)
            owner._parameters[attr] = new

        assign(fm.MG_EMBED, fm.hf_vocab_to_megatron(reader.get(fm.HF_EMBED, dtype), padded, 1)[0])
        bar = _Progress(dims.num_layers, "hf-to-megatron (torch_dist)", progress)
        for i in range(dims.num_layers):
            (layer,) = fm.hf_layer_to_megatron(_hf_layer(reader, dims, i, dtype), dims, 1)
            for name, t in layer.items():
                assign(f"decoder.layers.{i}.{name}", t)
            bar.update()
        bar.close()
        assign(fm.MG_FINAL_NORM, reader.get(fm.HF_FINAL_NORM, dtype))
        assign(
            fm.MG_OUTPUT, fm.hf_vocab_to_megatron(reader.get(fm.HF_LM_HEAD, dtype), padded, 1)[0]
        )
        if params:
            raise ConversionError(
                f"model parameters without a source tensor: {_short(list(params))}"
            )
        left = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_meta]
        if left:  # persistent state the converter does not fill (non-persistent buffers such as
            # the RoPE frequencies are not part of the state dict)
            raise ConversionError(f"model state without a source tensor: {_short(left)}")

        ckpt_dir = out / "release"
        ckpt_dir.mkdir(parents=True)
        metadata = mcp._build_sharded_state_dict_metadata(args)
        state = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0,
            "num_floating_point_operations_so_far": 0,
            "model": model.sharded_state_dict(metadata=metadata),
        }
        _log(f"writing torch_dist checkpoint to {ckpt_dir}")
        with _cpu_tolerant_megatron(), contextlib.redirect_stdout(io.StringIO()):
            dist_checkpointing.save(
                state,
                str(ckpt_dir),
                TorchDistSaveShardedStrategy(),
                content_metadata=mcp._clean_metadata_for_serialization(metadata),
            )


def hf_to_megatron(opts: argparse.Namespace) -> None:
    hf_dir = Path(opts.hf_dir)
    reader = HFReader(hf_dir)
    try:
        settings = fm.parse_hf_config(reader.config, opts.allow_unknown_config_keys)
        dims = settings.dims
        tp, pp = opts.target_tp, opts.target_pp
        fm.check_tensor_parallel(dims, tp)
        pp_layers = None
        if opts.target_pp_layers:
            pp_layers = [int(x) for x in opts.target_pp_layers.split(",")]
        counts = fm.pipeline_layer_counts(dims.num_layers, pp, pp_layers)
        reader.check(dims)

        names = reader.names()
        if opts.dtype == "auto":
            dtype = None  # keep every tensor's dtype
            counted = Counter(reader.dtype(n) for n in names)
            params_dtype = counted.most_common(1)[0][0]
            if len(counted) > 1:
                _log(f"mixed dtypes {dict(counted)} kept as they are; args record {params_dtype}")
        else:
            dtype = params_dtype = _DTYPES[opts.dtype]
        padded = fm.padded_vocab_size(dims.vocab, opts.make_vocab_size_divisible_by, tp)

        flags = fm.megatron_model_flags(settings, counts) + [
            "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", "1",
            "--seq-length", str(opts.seq_length or min(settings.max_position_embeddings, 4096)),
            "--ckpt-format", opts.ckpt_format,
            "--transformer-impl", "local",
            "--make-vocab-size-divisible-by", str(opts.make_vocab_size_divisible_by),
            # HF has no padding rows: mask Megatron's out of the softmax, so losses agree.
            "--unpadded-vocab-size", str(dims.vocab),
        ] + _dtype_flag(params_dtype)  # fmt: skip
        tokenizer = opts.tokenizer_model
        if tokenizer is None and not opts.no_tokenizer:
            if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
                tokenizer = str(hf_dir.resolve())
        if tokenizer:
            flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer]
        args = build_megatron_args(flags, world_size=tp * pp)
        if settings.rms_norm_eps != 1e-5:
            _log(
                f"warning: rms_norm_eps={settings.rms_norm_eps!r} is recorded, but Megatron's "
                f"--use-checkpoint-args does not restore it: pass --norm-epsilon "
                f"{settings.rms_norm_eps!r} when loading"
            )
        args.padded_vocab_size = padded
        args.vocab_size = dims.vocab
        setattr(args, fm.HF_CONFIG_ARG, dict(reader.config))
        args.load = None
        args.save = str(Path(opts.save_dir).resolve())

        total = sum(
            torch.Size(reader.shape(n)).numel() * (dtype or reader.dtype(n)).itemsize for n in names
        )
        if opts.ckpt_format == "torch":
            peak = total / pp
            what = "one pipeline stage"
        else:
            peak = total
            what = "the whole model (Megatron's torch_dist saver writes one state dict)"
        _log(
            f"{dims.num_layers} layers, TP={tp} PP={pp} (layers per stage {counts}), padded "
            f"vocab {dims.vocab} -> {padded}, model {_gib(total)}; peak host memory about "
            f"{_gib(int(peak))} ({what}) plus one layer"
        )

        with atomic_output_dir(Path(opts.save_dir), opts.force, [hf_dir]) as out:
            if opts.ckpt_format == "torch":
                _write_legacy(reader, dims, args, tp, counts, padded, dtype, out, not opts.quiet)
            else:
                _write_torch_dist(reader, dims, args, padded, dtype, out, not opts.quiet)
            (out / TRACKER).write_text("release")
        _log(f"wrote {opts.ckpt_format} checkpoint {opts.save_dir}")
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------


def _resolve_checkpoint_dir(load_dir: Path) -> Path:
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


class LegacyReader:
    """Reads the per-rank files of a legacy ``torch`` checkpoint, memory-mapped."""

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
            _checkpoint_name(ckpt_dir, r, s, self.pp).parent.name
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
                st = self._load(_checkpoint_name(ckpt_dir, r, s, self.pp))
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

    def check(self, dims: fm.FalconH1Dims, counts: List[int]) -> None:
        layer_keys = fm.mg_layer_keys(dims)
        for (r, s), model in self.models.items():
            expected = set()
            if s == 0:
                expected.add(fm.MG_EMBED)
            for local in range(counts[s]):
                expected.update(f"decoder.layers.{local}.{k}" for k in layer_keys)
            if s == self.pp - 1:
                expected.update((fm.MG_FINAL_NORM, fm.MG_OUTPUT))
            have = {k for k in model if not k.endswith("._extra_state")}
            missing = sorted(expected - have)
            unexpected = sorted(have - expected)
            if missing or unexpected:
                raise ConversionError(
                    f"rank TP={r} PP={s}: "
                    + "; ".join(
                        x
                        for x in (
                            f"missing tensor(s): {_short(missing)}" if missing else "",
                            f"unexpected tensor(s): {_short(unexpected)}" if unexpected else "",
                        )
                        if x
                    )
                )

    def embedding(self, name: str, stage: int) -> List[torch.Tensor]:
        return [self.models[(r, stage)][name] for r in range(self.tp)]

    def layer(self, stage: int, local: int, dims) -> List[Dict[str, torch.Tensor]]:
        prefix = f"decoder.layers.{local}."
        return [
            {k: self.models[(r, stage)][prefix + k] for k in fm.mg_layer_keys(dims)}
            for r in range(self.tp)
        ]


def _dcp_error(exc: BaseException) -> str:
    """The errors behind a PyTorch DCP ``CheckpointException`` (its str is a traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(repr(pair[0]) for pair in failures.values())
    return repr(exc)


class TorchDistReader:
    """Reads global tensors of a ``torch_dist`` checkpoint one layer at a time (PyTorch DCP)."""

    def __init__(self, ckpt_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron.core import dist_checkpointing

        self.ckpt_dir = ckpt_dir
        try:
            with _cpu_tolerant_megatron():
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

    def check(self, dims: fm.FalconH1Dims) -> int:
        if fm.MG_EMBED not in self.tensors:
            raise ConversionError(f"{self.ckpt_dir}: missing tensor {fm.MG_EMBED}")
        padded = int(self.tensors[fm.MG_EMBED].size[0])
        expected = fm.torch_dist_keys(dims, padded)
        missing = [k for k in expected if k not in self.tensors]
        unexpected = sorted(k for k in self.tensors if k not in expected)
        problems = []
        if missing:
            problems.append(f"missing tensor(s): {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected tensor(s): {_short(unexpected)}")
        for k, shape in expected.items():
            if k in self.tensors and tuple(self.tensors[k].size) != shape:
                problems.append(f"{k} has shape {tuple(self.tensors[k].size)}, expected {shape}")
        if problems:
            raise ConversionError(f"{self.ckpt_dir}: " + "; ".join(problems))
        return padded

    def read(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
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
                f"for {_short(list(keys), 3)}: {_dcp_error(exc)}"
            ) from exc
        return state


def _base_hf_config(args, hf_config: Optional[str]) -> Optional[dict]:
    """The HF config.json the model came from: ``--hf-config``, else the one hf-to-megatron
    recorded in the args, else the recorded tokenizer directory's (a Megatron run resaves only
    the args it knows, so a trained checkpoint keeps the tokenizer path but not the config)."""
    candidates = []
    if hf_config:
        path = Path(hf_config)
        candidates.append(path / "config.json" if path.is_dir() else path)
    recorded = getattr(args, fm.HF_CONFIG_ARG, None)
    if recorded and not hf_config:
        return dict(recorded)
    tok = getattr(args, "tokenizer_model", None)
    if tok and not hf_config:
        candidates.append(Path(tok) / "config.json")
    for path in candidates:
        if path.is_file():
            with open(path) as f:
                config = json.load(f)
            if config.get("model_type") == "falcon_h1":
                _log(f"non-model config fields (token ids, ...) from {path}")
                return config
        elif hf_config:
            raise ConversionError(f"--hf-config {hf_config}: no config.json there")
    return None


def refuse_bitnet_checkpoint(args, ckpt_dir: Path) -> None:
    """A ``--use-bitnet`` checkpoint is not a dense FalconH1 model: its forward pass quantises
    the weights to ternary and the activations to int8. Converting its latent weights would
    give a model that computes something else, so refuse and name the BitNet exporter."""
    if getattr(args, "use_bitnet", False):
        raise ConversionError(
            f"{ckpt_dir} is a BitNet checkpoint (trained with --use-bitnet): as a dense "
            "FalconH1ForCausalLM its full-precision latent weights would compute a different "
            "model. Export it with tools/checkpoint/bitnet_hf_export.py --load-dir DIR --save-dir OUT "
            "(transformers' bitnet format; --format dense writes the ternary weights beta*T)"
        )


def megatron_to_hf(opts: argparse.Namespace) -> None:
    load_dir = Path(opts.load_dir)
    ckpt_dir = _resolve_checkpoint_dir(load_dir)
    is_dist = (ckpt_dir / "metadata.json").is_file()
    reader = TorchDistReader(ckpt_dir) if is_dist else LegacyReader(ckpt_dir)
    refuse_bitnet_checkpoint(reader.args, ckpt_dir)
    base = _base_hf_config(reader.args, opts.hf_config)
    vocab = opts.vocab_size or (base or {}).get("vocab_size")
    settings, counts = fm.settings_from_megatron_args(reader.args, vocab)
    dims = settings.dims
    if is_dist:
        padded = reader.check(dims)
    else:
        fm.check_tensor_parallel(dims, reader.tp)
        reader.check(dims, counts)
        padded = int(sum(t.shape[0] for t in reader.embedding(fm.MG_EMBED, 0)))
    if padded < dims.vocab:
        raise ConversionError(f"padded vocabulary {padded} < vocab_size {dims.vocab}")
    cast = None if opts.dtype == "auto" else _DTYPES[opts.dtype]

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t if cast is None or t.dtype == cast else t.to(cast)

    config = fm.hf_config_from_settings(settings, base)
    _log(
        f"{'torch_dist' if is_dist else 'torch'} checkpoint {ckpt_dir}: {dims.num_layers} layers, "
        f"vocab {dims.vocab} (padded {padded})"
        + ("" if is_dist else f", TP={reader.tp} PP={reader.pp}")
    )
    max_shard = int(opts.max_shard_size * 2**30)
    with atomic_output_dir(Path(opts.save_dir), opts.force, [load_dir]) as out:
        writer = SafetensorsWriter(out, max_shard)
        offsets = fm.stage_offsets(counts)
        if is_dist:
            first = reader.read([fm.MG_EMBED])[fm.MG_EMBED]
        else:
            first = fm.merge_dim(reader.embedding(fm.MG_EMBED, 0), 0)
        writer.add(fm.HF_EMBED, conv(fm.megatron_vocab_to_hf([first], dims.vocab)))
        dtypes = {first.dtype}
        del first
        bar = _Progress(dims.num_layers, "megatron-to-hf", not opts.quiet)
        for i in range(dims.num_layers):
            if is_dist:
                keys = list(fm.torch_dist_layer_keys(dims, i))
                layer = fm.torch_dist_layer_to_hf(reader.read(keys), dims, i)
            else:
                stage = max(s for s in range(len(counts)) if offsets[s] <= i)
                shards = reader.layer(stage, i - offsets[stage], dims)
                fm.check_replicas_equal(
                    shards, ["input_layernorm.weight", "pre_mlp_layernorm.weight"]
                )
                layer = fm.megatron_layer_to_hf(shards, dims)
            for k in fm.hf_layer_keys(dims):
                writer.add(f"model.layers.{i}.{k}", conv(layer[k]))
                dtypes.add(layer[k].dtype)
            bar.update()
        bar.close()
        last = len(counts) - 1
        if is_dist:
            tail = reader.read([fm.MG_FINAL_NORM, fm.MG_OUTPUT])
            norm, head = tail[fm.MG_FINAL_NORM], [tail[fm.MG_OUTPUT]]
        else:
            norms = [{fm.MG_FINAL_NORM: t} for t in reader.embedding(fm.MG_FINAL_NORM, last)]
            fm.check_replicas_equal(norms, [fm.MG_FINAL_NORM])
            norm, head = norms[0][fm.MG_FINAL_NORM], reader.embedding(fm.MG_OUTPUT, last)
        writer.add(fm.HF_FINAL_NORM, conv(norm))
        writer.add(fm.HF_LM_HEAD, conv(fm.megatron_vocab_to_hf(head, dims.vocab)))
        writer.finish()

        out_dtype = cast or (next(iter(dtypes)) if len(dtypes) == 1 else None)
        if out_dtype is not None:
            name = str(out_dtype).replace("torch.", "")
            key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
            config[key] = name
        with open(out / "config.json", "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        tok = opts.tokenizer_dir or getattr(reader.args, "tokenizer_model", None)
        if tok and Path(tok).is_dir() and not opts.no_tokenizer:
            copied = [f for f in _TOKENIZER_FILES if (Path(tok) / f).is_file()]
            for f in copied:
                shutil.copy2(Path(tok) / f, out / f)
            if copied:
                _log(f"copied {', '.join(copied)} from {tok}")
    shards, size = len(writer.shards), _gib(writer.total_bytes)
    _log(f"wrote HF checkpoint {opts.save_dir} ({shards} shard(s), {size})")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert Falcon-H1 checkpoints between HF transformers and Megatron.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron checkpoint")
    h2m.add_argument("--hf-dir", required=True, help="directory with config.json + safetensors")
    h2m.add_argument("--save-dir", required=True, help="Megatron checkpoint directory to create")
    h2m.add_argument("--target-tp", type=int, default=1, help="tensor parallel size")
    h2m.add_argument("--target-pp", type=int, default=1, help="pipeline parallel size")
    h2m.add_argument(
        "--target-pp-layers",
        default=None,
        help="layers per pipeline stage, comma-separated (default: an even split)",
    )
    h2m.add_argument("--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist")
    h2m.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="dtype of the Megatron weights (auto: keep the HF dtypes, bit-exact)",
    )
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    h2m.add_argument("--seq-length", type=int, default=None, help="recorded --seq-length")
    h2m.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer recorded in the args (default: --hf-dir when it has tokenizer files)",
    )
    h2m.add_argument("--no-tokenizer", action="store_true", help="record no tokenizer")
    h2m.add_argument("--allow-unknown-config-keys", action="store_true")
    h2m.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    h2m.add_argument("--quiet", action="store_true", help="no progress bars")
    h2m.set_defaults(func=hf_to_megatron)

    m2h = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF safetensors")
    m2h.add_argument("--load-dir", required=True, help="Megatron checkpoint directory")
    m2h.add_argument("--save-dir", required=True, help="HF directory to create")
    m2h.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="dtype of the HF weights (auto: as stored in the checkpoint)",
    )
    m2h.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="unpadded vocabulary (default: from the HF config, else args.vocab_size)",
    )
    m2h.add_argument(
        "--hf-config",
        default=None,
        help="HF config.json (or its directory) to take the non-model fields from (default: "
        "the one recorded by hf-to-megatron, else the recorded tokenizer directory's)",
    )
    m2h.add_argument(
        "--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)"
    )
    m2h.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    m2h.add_argument("--no-tokenizer", action="store_true", help="copy no tokenizer files")
    m2h.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    m2h.add_argument("--quiet", action="store_true", help="no progress bars")
    m2h.set_defaults(func=megatron_to_hf)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        opts.func(opts)
    except ConversionError as exc:
        _log(f"error: {exc}")
        _log(f"nothing was written (--save-dir {opts.save_dir} is as it was)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
