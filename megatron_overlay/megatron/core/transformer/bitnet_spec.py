# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Turn a layer / stack spec into its BitNet b1.58 version (``--use-bitnet``).

:func:`to_bitnet_spec` walks a spec (``ModuleSpec`` trees, submodule dataclasses and the
``functools.partial`` builders upstream uses for MLPs) and replaces every projection it knows
with its BitNet class (``megatron.core.bitnet.layers``), keeping forward multipliers:

=============================  ==================  ======================================
submodule field                role                BitNet scale (beta) per
=============================  ==================  ======================================
``linear_qkv``                 ``linear_qkv``      q, k and v matrix (across TP ranks)
``linear_proj``                ``linear_proj``     matrix
``linear_fc1``                 ``linear_fc1``      gate and up matrix (gated MLPs)
``linear_fc2``                 ``linear_fc2``      matrix
``in_proj`` / ``out_proj``     ``mamba_*_proj``    matrix
=============================  ==================  ======================================

Embeddings, norms and the output layer are not part of layer specs and stay full precision.
Anything else that holds a linear layer (Transformer Engine modules, MoE experts, MLA, GDN,
multi-token prediction, ...) is an error naming the submodule: BitNet is never silently off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

# Submodule field -> (role, expected parallel kind)
_ROLES = {
    "linear_qkv": ("linear_qkv", ColumnParallelLinear),
    "linear_proj": ("linear_proj", RowParallelLinear),
    "linear_fc1": ("linear_fc1", ColumnParallelLinear),
    "linear_fc2": ("linear_fc2", RowParallelLinear),
    "in_proj": ("mamba_in_proj", ColumnParallelLinear),
    "out_proj": ("mamba_out_proj", RowParallelLinear),
}


class BitNetSpecError(ValueError):
    """A spec holds a module that BitNet training does not support."""


def validate_bitnet_config(config) -> None:
    """Reject option combinations ``--use-bitnet`` cannot honour (called from the config)."""
    if not getattr(config, "use_bitnet", False):
        if getattr(config, "bitnet_rms_norm", False):
            raise ValueError("--bitnet-rms-norm needs --use-bitnet")
        return
    problems = []
    if getattr(config, "transformer_impl", "local") != "local":
        problems.append(
            f"--transformer-impl {config.transformer_impl} (BitNet layers are local modules: "
            "pass --transformer-impl local)"
        )
    if getattr(config, "num_moe_experts", None):
        problems.append("--num-experts (MoE experts have no BitNet implementation)")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        problems.append("--fp8-format / --fp4-format (BitNet quantises weights itself)")
    if getattr(config, "tp_comm_overlap", False):
        problems.append("--tp-comm-overlap")
    if getattr(config, "multi_latent_attention", False):
        problems.append("--multi-latent-attention")
    if getattr(config, "mtp_num_layers", None):
        problems.append("--mtp-num-layers (multi-token prediction)")
    graph_impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if graph_impl != "none" or getattr(config, "enable_cuda_graph", False):
        # A replayed graph would keep using the ternary weights of the captured step: the
        # per-step weight cache is refreshed by Python code that a replay skips.
        problems.append(
            f"--cuda-graph-impl {graph_impl if graph_impl != 'none' else 'local'} (CUDA graphs "
            "would replay stale quantised weights)"
        )
    if getattr(config, "external_cuda_graph", False):
        problems.append("external CUDA graphs (would replay stale quantised weights)")
    if problems:
        raise ValueError("--use-bitnet does not support: " + "; ".join(problems))


def _linear_kind(value: Any):
    """ColumnParallelLinear / RowParallelLinear subclass a spec value builds, else None."""
    cls = value.module if isinstance(value, ModuleSpec) else value
    if isinstance(cls, type):
        for kind in (ColumnParallelLinear, RowParallelLinear):
            if issubclass(cls, kind):
                return kind
    return None


def _looks_like_linear(value: Any) -> bool:
    cls = value.module if isinstance(value, ModuleSpec) else value
    name = getattr(cls, "__name__", "") if isinstance(cls, type) else ""
    return "Linear" in name


def _convert_linear(value: Any, field: str, path: str):
    from megatron.core.bitnet.layers import bitnet_class_for

    role, expected = _ROLES[field]
    kind = _linear_kind(value)
    if kind is None:
        cls = value.module if isinstance(value, ModuleSpec) else value
        raise BitNetSpecError(
            f"--use-bitnet: {path} is {getattr(cls, '__name__', cls)!r}, which has no BitNet "
            "version (only local ColumnParallelLinear / RowParallelLinear projections do; "
            "use --transformer-impl local and a local spec)"
        )
    if kind is not expected:
        raise BitNetSpecError(
            f"--use-bitnet: {path} is a {kind.__name__}, expected {expected.__name__}"
        )
    if isinstance(value, ModuleSpec):
        return dataclasses.replace(value, module=bitnet_class_for(value.module, role))
    return bitnet_class_for(value, role)


def _walk(value: Any, path: str) -> Any:
    if isinstance(value, ModuleSpec):
        cls = value.module
        name = getattr(cls, "__name__", str(cls))
        if isinstance(cls, type) and ("MoE" in name or "Expert" in name or "TE" == name[:2]):
            raise BitNetSpecError(f"--use-bitnet: {path} ({name}) is not supported")
        if value.submodules is None:
            return value
        return dataclasses.replace(value, submodules=_walk(value.submodules, f"{path}.submodules"))
    if isinstance(value, functools.partial):
        keywords = dict(value.keywords)
        if "submodules" in keywords:
            keywords["submodules"] = _walk(keywords["submodules"], f"{path}.submodules")
        return functools.partial(value.func, *value.args, **keywords)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            child = getattr(value, field.name)
            child_path = f"{path}.{field.name}"
            if (
                field.name in _ROLES
                and child is not None
                and (_linear_kind(child) is not None or _looks_like_linear(child))
            ):
                changes[field.name] = _convert_linear(child, field.name, child_path)
            elif _looks_like_linear(child):
                raise BitNetSpecError(
                    f"--use-bitnet: {child_path} holds a linear layer BitNet does not convert"
                )
            else:
                changes[field.name] = _walk(child, child_path)
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, f"{path}[{i}]") for i, v in enumerate(value))
    if _looks_like_linear(value) and _linear_kind(value) is None:
        raise BitNetSpecError(f"--use-bitnet: {path} holds a linear layer BitNet does not convert")
    return value


def to_bitnet_spec(spec: Any, name: str = "spec") -> Any:
    """BitNet version of ``spec`` (a new spec; the input is not modified)."""
    return _walk(spec, name)
