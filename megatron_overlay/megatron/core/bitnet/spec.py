# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Turn a layer / stack spec into its BitNet b1.58 version (``--use-bitnet``).

:func:`to_bitnet_spec` walks a spec (``ModuleSpec`` trees, submodule dataclasses and the
``functools.partial`` builders upstream uses for MLPs) and replaces every projection it knows
with a ``ModuleSpec`` of the BitNet linear of the same parallel kind
(``megatron.core.bitnet.layers``) whose ``role`` parameter selects the beta segments; a
projection that applied forward multipliers (``ColumnParallelLinearWithMultipliers`` /
``RowParallelLinearWithMultipliers``) keeps them (``multipliers=True``):

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
Anything else that holds a linear layer (Transformer Engine modules, MoE layers and experts,
other linear classes) is an error naming the submodule: BitNet is never silently off. Modules
are identified by type.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from megatron.core.bitnet.functional import BACKENDS, DGRAD_IMPLS, WGRAD_IMPLS
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


# Model arguments a checkpoint records and `--use-checkpoint-args` restores (a BitNet checkpoint
# loaded without them would become a full-precision model of its latent weights). The kernel
# settings (bitnet_backend, bitnet_dgrad, bitnet_wgrad, bitnet_weight_cache) are not among
# them: they choose how this run computes the same model, for the machine it runs on.
BITNET_MODEL_ARG_NAMES = ("use_bitnet", "bitnet_rms_norm", "bitnet_rms_norm_eps")

# Kernel settings: config field -> (flag, allowed values or None for a bool, default).
_KERNEL_SETTINGS = {
    "bitnet_backend": ("--bitnet-backend", BACKENDS, "auto"),
    "bitnet_dgrad": ("--bitnet-dgrad", DGRAD_IMPLS, "cublas"),
    "bitnet_wgrad": ("--bitnet-wgrad", WGRAD_IMPLS, "cublas"),
    "bitnet_weight_cache": ("--no-bitnet-weight-cache", None, True),
}


class BitNetSpecError(ValueError):
    """A spec holds a module that BitNet training does not support."""


def validate_bitnet_config(config) -> None:
    """Reject option combinations ``--use-bitnet`` cannot honour (called from the config)."""
    for name, (flag, allowed, _) in _KERNEL_SETTINGS.items():
        value = getattr(config, name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    if not getattr(config, "use_bitnet", False):
        if getattr(config, "bitnet_rms_norm", False):
            raise ValueError("--bitnet-rms-norm needs --use-bitnet")
        for name, (flag, _, default) in _KERNEL_SETTINGS.items():
            if getattr(config, name) != default:
                raise ValueError(f"{flag} needs --use-bitnet")
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
    if graph_impl not in ("none", "full_iteration"):
        # The weight quantisation must be inside what a graph replays (see BitNetWeightCache).
        # Whole-iteration graphs are verified on a GPU; per-layer graphs are not with BitNet
        # (without it they trained wrongly before patch 0042), TE's graphs do not go through
        # the cache logic.
        problems.append(
            f"--cuda-graph-impl {graph_impl} (use full_iteration: its capture includes the "
            "per-step weight quantisation)"
        )
    if getattr(config, "external_cuda_graph", False):
        problems.append("external CUDA graphs (would replay stale quantised weights)")
    if problems:
        raise ValueError("--use-bitnet does not support: " + "; ".join(problems))


def _te_module_types() -> tuple:
    """Transformer Engine module base classes (empty without TE)."""
    try:
        import transformer_engine.pytorch as te
    except ImportError:  # TE absent (or broken): no TE module can be in a spec
        return ()
    return tuple(
        getattr(te, name)
        for name in ("Linear", "LayerNormLinear", "LayerNormMLP", "GroupedLinear")
        if hasattr(te, name)
    )


def _moe_types() -> tuple:
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return (MoELayer, SequentialMLP, TEGroupedMLP)


def _module_class(value: Any):
    cls = value.module if isinstance(value, ModuleSpec) else value
    return cls if isinstance(cls, type) else None


def _is_linear_class(cls) -> bool:
    """A class that holds a linear projection BitNet must convert or refuse."""
    if cls is None:
        return False
    linear_types = (ColumnParallelLinear, RowParallelLinear, torch.nn.Linear) + _te_module_types()
    return issubclass(cls, linear_types)


def _convert_linear(value: Any, field: str, path: str) -> ModuleSpec:
    from megatron.core.bitnet.layers import BitNetColumnParallelLinear, BitNetRowParallelLinear
    from megatron.core.transformer.forward_multipliers import (
        ColumnParallelLinearWithMultipliers,
        RowParallelLinearWithMultipliers,
    )

    role, expected = _ROLES[field]
    cls = _module_class(value)
    params = dict(value.params) if isinstance(value, ModuleSpec) else {}
    conversions = {
        ColumnParallelLinear: (ColumnParallelLinear, BitNetColumnParallelLinear, False),
        ColumnParallelLinearWithMultipliers: (
            ColumnParallelLinear,
            BitNetColumnParallelLinear,
            True,
        ),
        RowParallelLinear: (RowParallelLinear, BitNetRowParallelLinear, False),
        RowParallelLinearWithMultipliers: (RowParallelLinear, BitNetRowParallelLinear, True),
        BitNetColumnParallelLinear: (ColumnParallelLinear, BitNetColumnParallelLinear, None),
        BitNetRowParallelLinear: (RowParallelLinear, BitNetRowParallelLinear, None),
    }
    if cls not in conversions:
        raise BitNetSpecError(
            f"--use-bitnet: {path} is {getattr(cls, '__name__', cls)!r}, which has no BitNet "
            "version (only local ColumnParallelLinear / RowParallelLinear projections, with or "
            "without forward multipliers, do; use --transformer-impl local and a local spec)"
        )
    kind, bitnet_cls, multipliers = conversions[cls]
    if kind is not expected:
        raise BitNetSpecError(
            f"--use-bitnet: {path} is a {kind.__name__}, expected {expected.__name__}"
        )
    spec_role = params.get("role", role)
    if spec_role != role:
        raise BitNetSpecError(
            f"--use-bitnet: {path} has role {spec_role!r}; the {field} slot needs {role!r}"
        )
    params["role"] = role
    if multipliers is not None:
        params["multipliers"] = multipliers
    base = value if isinstance(value, ModuleSpec) else ModuleSpec(module=bitnet_cls)
    return dataclasses.replace(base, module=bitnet_cls, params=params)


def _walk(value: Any, path: str) -> Any:
    if isinstance(value, ModuleSpec):
        cls = _module_class(value)
        if cls is not None and issubclass(cls, _moe_types() + _te_module_types()):
            raise BitNetSpecError(f"--use-bitnet: {path} ({cls.__name__}) is not supported")
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
            if field.name in _ROLES and child is not None:
                changes[field.name] = _convert_linear(child, field.name, child_path)
            elif _is_linear_class(_module_class(child)):
                raise BitNetSpecError(
                    f"--use-bitnet: {child_path} holds a linear layer BitNet does not convert"
                )
            else:
                changes[field.name] = _walk(child, child_path)
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, f"{path}[{i}]") for i, v in enumerate(value))
    if _is_linear_class(_module_class(value)):
        raise BitNetSpecError(f"--use-bitnet: {path} holds a linear layer BitNet does not convert")
    return value


def to_bitnet_spec(spec: Any, name: str = "spec") -> Any:
    """BitNet version of ``spec`` (a new spec; the input is not modified)."""
    return _walk(spec, name)
