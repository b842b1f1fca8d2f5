# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Training on CPU (``--device cpu``) for development and CI machines without a GPU.

A CPU run uses the gloo backend, fp32 (or bf16) math and the local (non Transformer Engine)
layers. :func:`validate_device_args` resolves ``--device``, rejects options that cannot
work without CUDA (naming them), and turns off fusions that upstream enables by default
but that only exist as CUDA kernels. With CUDA it only records the device type, so GPU
runs are unchanged.
"""

import resource
from argparse import Namespace
from typing import Any, Callable, Dict, List, Tuple

import torch

from megatron.core.device_utils import set_device_type, using_cpu

# Options a CPU run cannot honour: (description shown to the user, predicate on args).
_CUDA_ONLY_OPTIONS: List[Tuple[str, Callable[[Namespace], bool]]] = [
    (
        "--transformer-impl transformer_engine (pass --transformer-impl local)",
        lambda a: getattr(a, "transformer_impl", None) == "transformer_engine",
    ),
    (
        "--transformer-impl inference_optimized",
        lambda a: getattr(a, "transformer_impl", None) == "inference_optimized",
    ),
    ("--fp16 (use fp32, or --bf16)", lambda a: getattr(a, "fp16", False)),
    ("--fp8-format", lambda a: getattr(a, "fp8", None) is not None),
    ("--fp4-format", lambda a: getattr(a, "fp4", None) is not None),
    (
        "--cuda-graph-impl",
        lambda a: getattr(a, "cuda_graph_impl", "none") != "none"
        or getattr(a, "enable_cuda_graph", False)
        or getattr(a, "external_cuda_graph", False),
    ),
    ("--tp-comm-overlap", lambda a: getattr(a, "tp_comm_overlap", False)),
    ("--use-megatron-fsdp", lambda a: getattr(a, "use_megatron_fsdp", False)),
    ("--use-torch-fsdp2", lambda a: getattr(a, "use_torch_fsdp2", False)),
    ("--te-rng-tracker", lambda a: getattr(a, "te_rng_tracker", False)),
    ("--use-nccl-ub", lambda a: getattr(a, "nccl_ub", False)),
    ("--use-sharp", lambda a: getattr(a, "use_sharp", False)),
    (
        "--cross-entropy-fusion-impl te (with --cross-entropy-loss-fusion)",
        lambda a: getattr(a, "cross_entropy_loss_fusion", False)
        and getattr(a, "cross_entropy_fusion_impl", None) == "te",
    ),
    ("--optimizer-cpu-offload", lambda a: getattr(a, "optimizer_cpu_offload", False)),
    ("--log-memory-to-tensorboard", lambda a: getattr(a, "log_memory_to_tensorboard", False)),
    ("--log-device-memory-used", lambda a: getattr(a, "log_device_memory_used", False)),
    ("--record-memory-history", lambda a: getattr(a, "record_memory_history", False)),
    (
        "--use-precision-aware-optimizer",
        lambda a: getattr(a, "use_precision_aware_optimizer", False),
    ),
]

# Fusions upstream turns on by default whose kernels need CUDA (apex / TE extensions);
# on CPU they are turned off (with a message) instead of failing later.
_CUDA_ONLY_DEFAULT_FUSIONS: List[Tuple[str, str]] = [
    ("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion"),
    ("masked_softmax_fusion", "--no-masked-softmax-fusion"),
    ("apply_rope_fusion", "--no-rope-fusion"),
]


# Fusions upstream turns on by default that are compiled with torch.compile: they work on
# CPU, but compiling them takes longer than a small CPU run, so CPU runs use the eager path.
_COMPILED_DEFAULT_FUSIONS: List[Tuple[str, str]] = [
    ("bias_gelu_fusion", "--no-bias-gelu-fusion"),
    ("bias_swiglu_fusion", "--no-bias-swiglu-fusion"),
    ("bias_dropout_fusion", "--no-bias-dropout-fusion"),
]


def _print_rank_0(args: Namespace, message: str) -> None:
    # torch.distributed is not initialized yet when arguments are validated.
    if getattr(args, "rank", 0) == 0:
        print(message, flush=True)


def resolve_device(requested: str) -> str:
    """Map the ``--device`` value to ``"cuda"`` or ``"cpu"``.

    ``auto`` keeps upstream's behaviour where a CUDA device exists and selects the CPU
    only where none does.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but no CUDA device is available.")
    return requested


def validate_device_args(args: Namespace) -> None:
    """Resolve ``args.device`` and, on CPU, make the remaining arguments CPU-compatible.

    Raises:
        ValueError: if a CPU run is combined with options that need CUDA.
    """
    args.device = resolve_device(getattr(args, "device", "auto"))
    set_device_type(args.device)
    if args.device != "cpu":
        return

    unsupported = [name for name, is_set in _CUDA_ONLY_OPTIONS if is_set(args)]
    if unsupported:
        raise ValueError(
            "Training on CPU (--device cpu, or no CUDA device present) does not support: "
            + "; ".join(unsupported)
            + ". Remove these options or run on a CUDA device."
        )

    if args.distributed_backend != "gloo":
        _print_rank_0(
            args,
            f"> training on CPU: using distributed backend gloo instead of "
            f"{args.distributed_backend}",
        )
        args.distributed_backend = "gloo"

    # Parameters are created where they live: on the CPU. (This is also the initialization that
    # builds each full weight before splitting it, so it does not depend on the TP size.)
    args.use_cpu_initialization = True

    turned_off = _turn_off(args, _CUDA_ONLY_DEFAULT_FUSIONS)
    if getattr(args, "no_persist_layer_norm", True) is False:
        args.no_persist_layer_norm = True
        turned_off.append("--no-persist-layer-norm")
    if turned_off:
        _print_rank_0(
            args,
            "> training on CPU: CUDA-only fusions turned off, as if given " + " ".join(turned_off),
        )
    turned_off = _turn_off(args, _COMPILED_DEFAULT_FUSIONS)
    if turned_off:
        _print_rank_0(
            args,
            "> training on CPU: torch.compile'd fusions turned off (eager is faster for small "
            "CPU runs), as if given " + " ".join(turned_off),
        )
    dtype = "bf16" if getattr(args, "bf16", False) else "fp32"
    _print_rank_0(args, f"> training on device: cpu (gloo backend, {dtype})")


def _turn_off(args: Namespace, fusions: List[Tuple[str, str]]) -> List[str]:
    """Set each enabled boolean in ``fusions`` to False; return the flags that did so."""
    turned_off = []
    for attr, flag in fusions:
        if getattr(args, attr, False):
            setattr(args, attr, False)
            turned_off.append(flag)
    return turned_off


def cpu_memory_report() -> str:
    """Memory of this process for ``report_memory`` on CPU: resident set size, now and peak (MB)."""
    mega_bytes = 1024.0 * 1024.0
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * resource.getpagesize()
        peak = max(peak, rss)
        current = f"{rss / mega_bytes:.2f}"
    except (OSError, IndexError, ValueError):  # not Linux
        current = "n/a"
    return f" | resident: {current} | max resident: {peak / mega_bytes:.2f}"


def cpu_dataloader_kwargs(args: Namespace) -> Dict[str, Any]:
    """Extra ``torch.utils.data.DataLoader`` arguments for CPU runs ({} on CUDA).

    On CPU, dropout draws from torch's default CPU generator, which a DataLoader also
    draws from each time an iterator is created. Giving the DataLoader its own generator
    keeps the model's random stream exactly as saved in a checkpoint, so a resumed run
    reproduces the uninterrupted one.
    """
    if not using_cpu():
        return {}
    return {"generator": torch.Generator().manual_seed(args.seed)}
