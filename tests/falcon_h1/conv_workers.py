"""Helpers of ``test_conversion.py``: load a converted checkpoint the way training does.

:func:`load_converted` does what ``pretrain_mamba.py --load DIR --use-checkpoint-args`` does with
a checkpoint: Megatron's ``parse_args`` with no model flags, ``load_args_from_checkpoint``,
``validate_args``, ``hybrid_builder`` and ``load_checkpoint``. :func:`run_world` runs
:func:`worker` on a CPU gloo world of TP x PP ranks (forked processes); each rank loads the
legacy checkpoint of its rank, runs one forward pass through the pipeline (activations passed
stage to stage with gloo point-to-point), the last stage gathers the vocabulary-parallel logits;
then the rank reloads its weights from a ``torch_dist`` checkpoint that the converter wrote from
one process (Megatron resharding it) and compares them with the legacy ones; finally the world
saves its model as Megatron does (legacy layout, and optionally ``dist_checkpointing``) for the
parent to convert back to HF.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

# Flags a CPU run needs besides --load / --use-checkpoint-args / parallel sizes: execution
# settings (no Transformer Engine, apex or fused kernels), not model flags.
CPU_RUN_FLAGS = (
    "--micro-batch-size", "1",
    "--transformer-impl", "local",
    "--use-cpu-initialization",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
)  # fmt: skip


@contextlib.contextmanager
def cpu_tolerant():
    """The converter's context for Megatron's CUDA-only calls on CPU (see the tool), plus a
    CPU ``read_metadata``: upstream's all-reduces the tracker's iteration in a CUDA tensor
    whenever torch.distributed is initialized. Nothing changes on a machine with CUDA."""
    from conversion_io import cpu_tolerant_megatron
    from megatron.training import checkpointing

    if torch.cuda.is_available():
        yield
        return
    original = checkpointing.read_metadata

    def read_metadata(tracker_filename):
        text = Path(tracker_filename).read_text().strip()
        return (0, True) if text == "release" else (int(text), False)

    checkpointing.read_metadata = read_metadata
    try:
        with cpu_tolerant_megatron():
            yield
    finally:
        checkpointing.read_metadata = original


def megatron_args_from_checkpoint(
    load_dir: str, tp: int, pp: int, ckpt_format: str, extra_flags: Sequence[str] = ()
):
    """Megatron args as ``pretrain_mamba.py --use-checkpoint-args`` builds them (``extra_flags``:
    more run flags, e.g. ``--bf16``)."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint

    saved_argv = sys.argv
    sys.argv = [
        "pretrain_mamba.py",
        "--load", str(load_dir),
        "--use-checkpoint-args",
        "--ckpt-format", ckpt_format,
        "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
        *CPU_RUN_FLAGS,
        *extra_flags,
    ]  # fmt: skip
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()), cpu_tolerant():
            args = parse_args()
            args, _ = load_args_from_checkpoint(args)
            validate_args(args)
    finally:
        sys.argv = saved_argv
    return args


def load_converted(
    load_dir,
    ckpt_format: str,
    model=None,
    args_override: Optional[dict] = None,
    extra_flags: Sequence[str] = (),
):
    """(args, model) for this rank, built from the checkpoint's args and loaded with Megatron's
    ``load_checkpoint`` (model-parallel state must be initialized). Pass ``model`` to reload."""
    from hybrid_builders import hybrid_builder
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import set_args

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    args = megatron_args_from_checkpoint(load_dir, tp, pp, ckpt_format, extra_flags)
    for key, value in (args_override or {}).items():
        setattr(args, key, value)
    if model is None:
        with contextlib.redirect_stdout(io.StringIO()):
            model = hybrid_builder(
                args,
                pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
            )
    set_args(args)
    init_num_microbatches_calculator(
        0, None, args.global_batch_size, args.micro_batch_size, args.data_parallel_size
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), cpu_tolerant():
            load_checkpoint([model], None, None, strict=True)
    finally:
        destroy_num_microbatches_calculator()
        set_args(None)
    return args, model


def pipeline_forward(model, tokens, positions, hidden_size: int):
    """One forward pass of this rank's pipeline stage; the last stage returns its logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    first = ps.is_pipeline_first_stage()
    last = ps.is_pipeline_last_stage()
    if not first:
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(
            input_ids=tokens if first else None, position_ids=positions, attention_mask=None
        )
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def gather_logits(local_logits, vocab: int):
    """Vocabulary-parallel logits of the TP group, concatenated and unpadded."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local_logits) for _ in range(tp)]
    dist.all_gather(parts, local_logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab]


def worker(rank: int, world: int, tp: int, pp: int, spec: dict) -> None:
    """One rank of :func:`run_world`."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    init = f"file://{spec['work']}/init_{tp}x{pp}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    work = Path(spec["work"])
    data = torch.load(work / "inputs.pt")
    result = {}
    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(1234)

    args, model = load_converted(spec["legacy_dir"], "torch")
    model.eval()
    legacy = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    out = pipeline_forward(model, data["tokens"], data["positions"], args.hidden_size)
    if out is not None:
        logits = gather_logits(out, data["vocab"])
        if ps.get_tensor_model_parallel_rank() == 0:
            result["max_abs_diff"] = (logits - data["hf_logits"]).abs().max().item()

    # The converter's one-process torch_dist checkpoint, resharded by Megatron onto this rank.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    override = {"hybrid_layer_pattern": args.hybrid_layer_pattern}
    args_dist, _ = load_converted(spec["dist_dir"], "torch_dist", model, override)
    result["torch_dist_mismatches"] = [
        k
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and not torch.equal(v, legacy[k])
    ]
    result["legacy_keys"] = sorted(legacy)

    # Saved as Megatron's save_checkpoint lays out a legacy checkpoint of this rank.
    out_dir = work / f"megatron_legacy_{tp}x{pp}"
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if pp > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    (out_dir / "release" / name).mkdir(parents=True, exist_ok=True)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
    state["model"] = model.state_dict_for_save_checkpoint()
    torch.save(state, out_dir / "release" / name / "model_optim_rng.pt")
    if rank == 0:
        (out_dir / "latest_checkpointed_iteration.txt").write_text("release")

    if spec.get("megatron_dist_save"):
        # Saved with Megatron's dist_checkpointing from this TP x PP world.
        save_dir = work / f"megatron_dist_{tp}x{pp}" / "release"
        if rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir.parent / "latest_checkpointed_iteration.txt").write_text("release")
        dist.barrier()
        state = {"args": args_dist, "checkpoint_version": 3.0, "iteration": 0}
        state["model"] = model.sharded_state_dict()
        with contextlib.redirect_stdout(io.StringIO()), cpu_tolerant():
            dist_checkpointing.save(state, str(save_dir))
    torch.save(result, work / f"result_{tp}x{pp}_{rank}.pt")
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# Imported once by the fork server, so that each rank starts without importing Megatron again.
_PRELOAD = [
    "torch",
    "falcon_h1.conv_workers",
    "falcon_h1_conversion",
    "hybrid_builders",
    "megatron.training.arguments",
    "megatron.training.checkpointing",
    "megatron.core.dist_checkpointing",
]


def run_world(tp: int, pp: int, spec: dict) -> List[dict]:
    """Run :func:`worker` on ``tp * pp`` CPU processes; returns each rank's result.

    Ranks are forked from a fork server (a clean single-threaded process that imported Megatron
    once): forking the test process itself can deadlock on locks its threads hold, and spawning
    would import Megatron again in every rank.
    """
    import torch.multiprocessing as mp

    from cpu_ranks import forkserver_env

    world = tp * pp
    with forkserver_env(_PRELOAD, [p for p in sys.path if p and os.path.isdir(p)]):
        mp.start_processes(
            worker, args=(world, tp, pp, spec), nprocs=world, start_method="forkserver"
        )
    return [torch.load(Path(spec["work"]) / f"result_{tp}x{pp}_{r}.pt") for r in range(world)]
