"""Helpers of ``test_bitnet_hf_export.py``: tiny BitNet trainings and Megatron's own reference.

:func:`train` runs ``pretrain_gpt.py`` / ``pretrain_mamba.py`` with torchrun on CPU (the model
flags of a ``tests/functional_tests/test_cases/bitnet/*`` case, a few iterations, ``--save`` in
the legacy ``torch`` format).

:func:`run_reference` loads such a checkpoint into Megatron at its own TP size (one forked
gloo process per rank; each rank builds the model from the checkpoint's args with the
training builders and loads its own rank file) and records, from Megatron's BitNet layers
themselves:

* the logits of one forward pass on given tokens (vocabulary-parallel logits gathered);
* per BitNet linear and rank: the ternary ``T`` and the per-row ``beta`` the layer computes
  (its weight cache, with the cross-rank reductions), the per-logical-matrix betas
  (``bitnet_segment_betas``) and the ``--bitnet-rms-norm`` weight;
* optionally a ``torch_dist`` checkpoint of the loaded model saved with Megatron's
  ``dist_checkpointing`` from that world (what a training run with ``--ckpt-format
  torch_dist`` writes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
CASES = ROOT / "tests" / "functional_tests" / "test_cases" / "bitnet"


def _functional_runner():
    """``scripts/functional.py`` as a module (its case loader and argv builder)."""
    spec = importlib.util.spec_from_file_location(
        "falcon_mcore_functional", ROOT / "scripts" / "functional.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(
    build: Path, case: str, save_dir: Path, overrides: Optional[dict] = None, iters: int = 2
) -> Path:
    """Train the functional case ``bitnet/<case>`` for ``iters`` iterations on CPU and save a
    legacy checkpoint in ``save_dir``; returns ``save_dir``. ``overrides`` change MODEL_ARGS
    (``True`` adds a bare flag, ``None`` removes one)."""
    import yaml

    runner = _functional_runner()
    config = yaml.safe_load((CASES / case / "model_config.yaml").read_text())
    merged = {
        "--train-iters": iters,
        "--lr-warmup-iters": 1,
        "--save": str(save_dir),
        "--save-interval": iters,
        "--ckpt-format": "torch",
    }
    merged.update(overrides or {})
    argv = runner.model_args(config, {}, merged)
    nproc = int(config.get("NUM_PROCESSES", 1))
    if "--tensor-model-parallel-size" in merged:
        nproc = int(merged["--tensor-model-parallel-size"])
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (config.get("ENV_VARS") or {}).items()})
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(build)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(runner.free_port()), str(build / config["SCRIPT"]), *argv,
    ]  # fmt: skip
    log = save_dir.parent / f"{save_dir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=build, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"training {case} failed (exit {proc.returncode}):\n{tail}")
    if not (save_dir / "latest_checkpointed_iteration.txt").is_file():
        raise RuntimeError(f"training {case} saved no checkpoint in {save_dir}")
    return save_dir


def _rank_file(ckpt: Path, rank: int) -> Path:
    step = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    sub = "release" if step == "release" else f"iter_{int(step):07d}"
    return ckpt / sub / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"


def worker(rank: int, world: int, spec: dict) -> None:
    """One rank of :func:`run_reference`."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    work = Path(spec["work"])
    dist.init_process_group(
        "gloo", init_method=f"file://{work}/init_{spec['tag']}", rank=rank, world_size=world
    )
    from megatron.core import parallel_state as ps
    from megatron.core.bitnet.functional import invalidate_weight_caches
    from megatron.core.bitnet.layers import BitNetLinearMixin
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.global_vars import set_args

    ps.initialize_model_parallel(world, 1)
    model_parallel_cuda_manual_seed(1234)
    state = torch.load(_rank_file(Path(spec["ckpt"]), rank), map_location="cpu", weights_only=False)
    args = state["args"]
    set_args(args)
    with contextlib.redirect_stdout(io.StringIO()):
        if getattr(args, "hybrid_layer_pattern", None):
            from hybrid_builders import hybrid_builder as builder
        else:
            from gpt_builders import gpt_builder as builder
        model = builder(args, pre_process=True, post_process=True)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    invalidate_weight_caches(model)

    tokens = spec["tokens"]
    seq = tokens.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    # Megatron's convention: True = masked (what the GPT data loader builds).
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        local = model(input_ids=tokens, position_ids=positions, attention_mask=causal)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    result: Dict[str, object] = {"logits": torch.cat(parts, dim=-1)}

    layers = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, BitNetLinearMixin):
                continue
            q = module.bitnet_quantized_weight()
            layers[name] = {
                "t": q.t.clone(),
                "beta": q.beta.clone(),
                "segments": {k: v.clone() for k, v in module.bitnet_segment_betas().items()},
                "rms_norm": None if module.rms_norm is None else module.rms_norm.weight.clone(),
            }
    result["layers"] = layers

    if spec.get("dist_dir"):
        _save_torch_dist(model, args, state, Path(spec["dist_dir"]), rank)
    torch.save(result, work / f"ref_{spec['tag']}_{rank}.pt")
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _save_torch_dist(model, args, state: dict, out: Path, rank: int) -> None:
    """Save ``model`` as Megatron's ``torch_dist`` format (model weights only)."""
    import torch.distributed as dist
    from falcon_h1.conv_workers import cpu_tolerant
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata

    step_dir = out / f"iter_{int(state['iteration']):07d}"
    if rank == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
        (out / "latest_checkpointed_iteration.txt").write_text(str(int(state["iteration"])))
    dist.barrier()
    args.ckpt_format = "torch_dist"
    sd = {"args": args, "checkpoint_version": 3.0, "iteration": state["iteration"]}
    with contextlib.redirect_stdout(io.StringIO()), cpu_tolerant():
        sd["model"] = model.sharded_state_dict(metadata=_build_sharded_state_dict_metadata(args))
        dist_checkpointing.save(sd, str(step_dir))


# Imported once by the fork server, so that each rank starts without importing Megatron again.
_PRELOAD = [
    "torch",
    "bitnet_export.megatron_reference",
    "gpt_builders",
    "hybrid_builders",
    "megatron.training.checkpointing",
    "megatron.core.dist_checkpointing",
]


def run_reference(
    ckpt: Path,
    tp: int,
    tokens: torch.Tensor,
    work: Path,
    tag: str,
    dist_dir: Optional[Path] = None,
) -> List[dict]:
    """Megatron's logits and quantised weights of legacy checkpoint ``ckpt`` (TP ``tp``, PP 1);
    one result per TP rank (see the module docstring)."""
    import torch.multiprocessing as mp

    from cpu_ranks import forkserver_env

    spec = {
        "work": str(work),
        "ckpt": str(ckpt),
        "tokens": tokens,
        "tag": tag,
        "dist_dir": str(dist_dir) if dist_dir else None,
    }
    (work / f"init_{tag}").unlink(missing_ok=True)  # a stale rendezvous file would hang gloo
    with forkserver_env(_PRELOAD, [p for p in sys.path if p and os.path.isdir(p)]):
        mp.start_processes(worker, args=(tp, spec), nprocs=tp, start_method="forkserver")
    return [torch.load(work / f"ref_{tag}_{r}.pt", weights_only=False) for r in range(tp)]


def megatron_segment_names(results: Sequence[dict], suffix: str) -> Dict[str, dict]:
    """``{layer name: per-rank entries}`` of the BitNet linears whose name ends with ``suffix``."""
    names = sorted(n for n in results[0]["layers"] if n.endswith(suffix))
    return {n: [r["layers"][n] for r in results] for n in names}
