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
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent  # the Megatron tree
for _p in (str(_HERE), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import falcon_h1_config as cfg  # noqa: E402
import falcon_h1_layouts as layouts  # noqa: E402
import falcon_h1_parallel as parallel  # noqa: E402
from conversion_io import (  # noqa: E402
    CHECKPOINT_VERSION,
    TRACKER,
    ConversionError,
    HFReader,
    Progress,
    SafetensorsWriter,
    atomic_output_dir,
    checkpoint_file,
    cpu_tolerant_megatron,
    gib,
    logger,
    open_megatron_checkpoint,
    run_tool,
    short_list,
)
from falcon_h1_checkpoint import FalconH1Checkpoint  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
_log = logger("falcon-h1-convert")


# --------------------------------------------------------------------------------------------
# Megatron arguments
# --------------------------------------------------------------------------------------------


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
        with contextlib.redirect_stdout(captured), cpu_tolerant_megatron():
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


def _hf_layer(
    reader: HFReader, dims: layouts.FalconH1Dims, i: int, dtype
) -> Dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k: reader.get(prefix + k, dtype) for k in layouts.hf_layer_keys(dims)}


def _write_legacy(reader, dims, args, tp, counts, padded, dtype, out: Path, progress) -> None:
    """Megatron's legacy per-rank format: release/mp_rank_TT[_PPP]/model_optim_rng.pt."""
    pp = len(counts)
    offsets = parallel.stage_offsets(counts)
    release = out / "release"
    bar = Progress(dims.num_layers, "hf-to-megatron (torch)", progress)
    for s in range(pp):
        ranks: List[Dict[str, object]] = [{} for _ in range(tp)]
        if s == 0:
            for r, shard in enumerate(
                layouts.hf_vocab_to_megatron(reader.get(layouts.HF_EMBED, dtype), padded, tp)
            ):
                ranks[r][layouts.MG_EMBED] = shard
        for local in range(counts[s]):
            i = offsets[s] + local
            shards = layouts.hf_layer_to_megatron(_hf_layer(reader, dims, i, dtype), dims, tp)
            prefix = f"decoder.layers.{local}."
            for r in range(tp):
                for name, t in shards[r].items():
                    ranks[r][prefix + name] = t
                for name in layouts.MG_LAYER_EXTRA_STATES:
                    ranks[r][prefix + name] = None
            bar.update()
        if s == pp - 1:
            norm = reader.get(layouts.HF_FINAL_NORM, dtype)
            head = layouts.hf_vocab_to_megatron(reader.get(layouts.HF_LM_HEAD, dtype), padded, tp)
            for r in range(tp):
                ranks[r][layouts.MG_FINAL_NORM] = norm
                ranks[r][layouts.MG_OUTPUT] = head[r]
                ranks[r][layouts.MG_OUTPUT_EXTRA_STATE] = None
        for r in range(tp):
            path = checkpoint_file(release, r, s, pp)
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

        assign(
            layouts.MG_EMBED,
            layouts.hf_vocab_to_megatron(reader.get(layouts.HF_EMBED, dtype), padded, 1)[0],
        )
        bar = Progress(dims.num_layers, "hf-to-megatron (torch_dist)", progress)
        for i in range(dims.num_layers):
            (layer,) = layouts.hf_layer_to_megatron(_hf_layer(reader, dims, i, dtype), dims, 1)
            for name, t in layer.items():
                assign(f"decoder.layers.{i}.{name}", t)
            bar.update()
        bar.close()
        assign(layouts.MG_FINAL_NORM, reader.get(layouts.HF_FINAL_NORM, dtype))
        assign(
            layouts.MG_OUTPUT,
            layouts.hf_vocab_to_megatron(reader.get(layouts.HF_LM_HEAD, dtype), padded, 1)[0],
        )
        if params:
            raise ConversionError(
                f"model parameters without a source tensor: {short_list(list(params))}"
            )
        left = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_meta]
        if left:  # persistent state the converter does not fill (non-persistent buffers such as
            # the RoPE frequencies are not part of the state dict)
            raise ConversionError(f"model state without a source tensor: {short_list(left)}")

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
        with cpu_tolerant_megatron(), contextlib.redirect_stdout(io.StringIO()):
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
        settings = cfg.parse_hf_config(reader.config, opts.allow_unknown_config_keys)
        dims = settings.dims
        tp, pp = opts.target_tp, opts.target_pp
        parallel.check_tensor_parallel(dims, tp)
        pp_layers = None
        if opts.target_pp_layers:
            pp_layers = [int(x) for x in opts.target_pp_layers.split(",")]
        counts = parallel.pipeline_layer_counts(dims.num_layers, pp, pp_layers)
        reader.check(layouts.hf_shapes(dims))

        names = reader.names()
        if opts.dtype == "auto":
            dtype = None  # keep every tensor's dtype
            counted = Counter(reader.dtype(n) for n in names)
            params_dtype = counted.most_common(1)[0][0]
            if len(counted) > 1:
                _log(f"mixed dtypes {dict(counted)} kept as they are; args record {params_dtype}")
        else:
            dtype = params_dtype = _DTYPES[opts.dtype]
        padded = parallel.padded_vocab_size(dims.vocab, opts.make_vocab_size_divisible_by, tp)

        flags = cfg.megatron_model_flags(settings, counts) + [
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
        setattr(args, cfg.HF_CONFIG_ARG, dict(reader.config))
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
            f"vocab {dims.vocab} -> {padded}, model {gib(total)}; peak host memory about "
            f"{gib(int(peak))} ({what}) plus one layer"
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
    reader = open_megatron_checkpoint(load_dir)
    ckpt_dir = reader.ckpt_dir
    refuse_bitnet_checkpoint(reader.args, ckpt_dir)
    ckpt = FalconH1Checkpoint(reader, opts.vocab_size, opts.hf_config)
    dims = ckpt.dims
    cast = None if opts.dtype == "auto" else _DTYPES[opts.dtype]

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t if cast is None or t.dtype == cast else t.to(cast)

    config = ckpt.config()
    _log(
        f"{'torch_dist' if reader.is_dist else 'torch'} checkpoint {ckpt_dir}: "
        f"{dims.num_layers} layers, vocab {dims.vocab} (padded {ckpt.padded})"
        + ("" if reader.is_dist else f", TP={reader.tp} PP={reader.pp}")
    )
    max_shard = int(opts.max_shard_size * 2**30)
    with atomic_output_dir(Path(opts.save_dir), opts.force, [load_dir]) as out:
        writer = SafetensorsWriter(out, max_shard)
        embed = ckpt.embedding()
        writer.add(layouts.HF_EMBED, conv(embed))
        dtypes = {embed.dtype}
        del embed
        bar = Progress(dims.num_layers, "megatron-to-hf", not opts.quiet)
        for i in range(dims.num_layers):
            layer, _ = ckpt.layer(i)
            for k in layouts.hf_layer_keys(dims):
                writer.add(f"model.layers.{i}.{k}", conv(layer[k]))
                dtypes.add(layer[k].dtype)
            bar.update()
        bar.close()
        norm, head = ckpt.tail()
        writer.add(layouts.HF_FINAL_NORM, conv(norm))
        writer.add(layouts.HF_LM_HEAD, conv(head))
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
    shards, size = len(writer.shards), gib(writer.total_bytes)
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
    return run_tool(opts.func, opts, _log)


if __name__ == "__main__":
    sys.exit(main())
