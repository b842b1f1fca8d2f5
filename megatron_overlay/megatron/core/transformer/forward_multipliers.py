# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Non-learnable forward multipliers (Falcon-H1's muP multipliers) applied by linear layers.

Falcon-H1 scales the inputs and outputs of its projections by fixed numbers from the model
config. Applying them *inside* the projection modules, rather than at each call site, means every
code path that runs a projection (training, the memory-efficient and plain Mamba paths, prefill
and decode) applies them, and that no fused norm + linear can scale an input before its norm (the
input multiplier is applied to the normed activation the linear receives).

A projection learns its role from its class: ``with_forward_multipliers(ColumnParallelLinear,
"mamba_in_proj")`` returns a subclass (cached, importable by name from this module) whose forward
applies the multipliers of that role. The same works for Transformer Engine and BitNet linears.
When every multiplier of a role is 1.0 the subclass performs no extra operation, so models that do
not set the multipliers are bit-identical to the plain linear.

Roles:

* ``linear_qkv``: input x ``attention_in_multiplier``; key channels x ``key_multiplier``
  (before RoPE, which is linear, so this equals HF's scaling of the key projection).
* ``linear_proj``: output x ``attention_out_multiplier``.
* ``mamba_in_proj``: input x ``ssm_in_multiplier``; the z / x / B / C / dt segments of the
  output x ``ssm_multipliers`` (HF's ``mup_vector``).
* ``mamba_out_proj``: output x ``ssm_out_multiplier``.
* ``linear_fc1``: gate half of the (gated) fc1 output x ``mlp_multipliers[0]``.
* ``linear_fc2``: output x ``mlp_multipliers[1]``.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size

ROLES = (
    "linear_qkv",
    "linear_proj",
    "mamba_in_proj",
    "mamba_out_proj",
    "linear_fc1",
    "linear_fc2",
)

# Model arguments a checkpoint records and `--use-checkpoint-args` restores.
MODEL_ARG_NAMES = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
    "ssm_multipliers",
    "mlp_multipliers",
    "mamba_rms_norm",
    "mamba_chunk_size",
    "mamba_conv_kernel",
)

# Config fields that only projections apply (the embedding / lm-head multipliers are applied
# by the embedding and the language model head).
LAYER_MULTIPLIER_FIELDS = {
    "attention_in_multiplier": "linear_qkv",
    "key_multiplier": "linear_qkv",
    "attention_out_multiplier": "linear_proj",
    "ssm_in_multiplier": "mamba_in_proj",
    "ssm_multipliers": "mamba_in_proj",
    "ssm_out_multiplier": "mamba_out_proj",
    "mlp_multipliers": "linear_fc1",
}


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def validate_forward_multipliers(config: TransformerConfig) -> None:
    """Check the multiplier and Mamba-shape fields of a config; raise ValueError naming the flag.

    Called from ``TransformerConfig.__post_init__``.
    """
    for name, count in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
        values = getattr(config, name, None)
        if values is None:
            continue
        if isinstance(values, (int, float)) or len(values) != count:
            raise ValueError(f"{_flag(name)} takes exactly {count} numbers, got {values!r}")
        setattr(config, name, [float(v) for v in values])
    for name in (
        "embedding_multiplier",
        "lm_head_multiplier",
        "key_multiplier",
        "attention_in_multiplier",
        "attention_out_multiplier",
        "ssm_in_multiplier",
        "ssm_out_multiplier",
    ):
        value = getattr(config, name, 1.0)
        if (
            not isinstance(value, (int, float))
            or value != value
            or value in (float("inf"), -float("inf"))
        ):
            raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
    if getattr(config, "key_multiplier", 1.0) != 1.0 and getattr(config, "qk_layernorm", False):
        raise ValueError(
            "--key-multiplier scales keys before RoPE; with --qk-layernorm the key norm would "
            "undo it. Use one or the other."
        )
    if _mlp_multipliers(config)[0] != 1.0 and not config.gated_linear_unit:
        raise ValueError("--mlp-multipliers GATE needs a gated MLP (--swiglu)")
    if getattr(config, "mamba_chunk_size", 128) <= 0:
        raise ValueError(f"--mamba-chunk-size must be positive, got {config.mamba_chunk_size}")
    if getattr(config, "mamba_conv_kernel", 4) < 1:
        raise ValueError(f"--mamba-conv-kernel must be >= 1, got {config.mamba_conv_kernel}")


def _ssm_multipliers(config: TransformerConfig) -> tuple[float, float, float, float, float]:
    values = getattr(config, "ssm_multipliers", None)
    return tuple(values) if values is not None else (1.0,) * 5


def _mlp_multipliers(config: TransformerConfig) -> tuple[float, float]:
    values = getattr(config, "mlp_multipliers", None)
    return tuple(values) if values is not None else (1.0, 1.0)


def role_is_identity(config: TransformerConfig, role: str) -> bool:
    """True when every multiplier of ``role`` is 1.0 for this config."""
    input_mult, output_mult = _role_scalars(config, role)
    if role == "linear_qkv":
        return input_mult == 1.0 and getattr(config, "key_multiplier", 1.0) == 1.0
    if role == "mamba_in_proj":
        return input_mult == 1.0 and all(m == 1.0 for m in _ssm_multipliers(config))
    if role == "linear_fc1":
        return _mlp_multipliers(config)[0] == 1.0
    return input_mult == 1.0 and output_mult == 1.0


def _role_scalars(config: TransformerConfig, role: str) -> tuple[float, float]:
    """(input multiplier, scalar output multiplier) of a role."""
    if role == "linear_qkv":
        return getattr(config, "attention_in_multiplier", 1.0), 1.0
    if role == "linear_proj":
        return 1.0, getattr(config, "attention_out_multiplier", 1.0)
    if role == "mamba_in_proj":
        return getattr(config, "ssm_in_multiplier", 1.0), 1.0
    if role == "mamba_out_proj":
        return 1.0, getattr(config, "ssm_out_multiplier", 1.0)
    if role == "linear_fc1":
        return 1.0, 1.0
    if role == "linear_fc2":
        return 1.0, _mlp_multipliers(config)[1]
    raise ValueError(f"unknown forward-multiplier role {role!r}; expected one of {ROLES}")


def qkv_output_multipliers(config: TransformerConfig, local_out: int, tp_size: int) -> torch.Tensor:
    """Per-channel multipliers of one TP rank's fused QKV output (key channels x key_mult).

    Megatron lays the fused QKV output out per query group: the group's query heads, then its
    key head, then its value head, each ``kv_channels`` wide.
    """
    if config.num_query_groups % tp_size != 0:
        raise ValueError(
            f"--key-multiplier needs --num-query-groups ({config.num_query_groups}) divisible by "
            f"the tensor-parallel size ({tp_size})"
        )
    head_dim = config.kv_channels
    heads_per_group = config.num_attention_heads // config.num_query_groups
    group_width = (heads_per_group + 2) * head_dim
    if local_out % group_width != 0:
        raise ValueError(
            f"fused QKV output of {local_out} channels per rank is not a whole number of query "
            f"groups of width {group_width}; cannot place --key-multiplier"
        )
    vector = torch.ones(local_out // group_width, heads_per_group + 2, head_dim)
    vector[:, heads_per_group, :] = config.key_multiplier
    return vector.reshape(-1)


def mamba_in_proj_output_multipliers(config: TransformerConfig, local_out: int, tp_size: int):
    """Per-channel multipliers of one TP rank's Mamba in_proj output [z, x, B, C, dt]."""
    if config.mamba_num_groups % tp_size != 0:
        raise ValueError(
            f"--mamba-num-groups {config.mamba_num_groups} is not divisible by the tensor-parallel "
            f"size {tp_size}"
        )
    groups_state = config.mamba_num_groups // tp_size * config.mamba_state_dim
    rest = local_out - 2 * groups_state  # 2 * d_inner_local + nheads_local
    nheads, remainder = divmod(rest, 2 * config.mamba_head_dim + 1)
    if remainder != 0 or nheads <= 0:
        raise ValueError(
            f"Mamba in_proj output of {local_out} channels per rank does not match "
            f"--mamba-head-dim {config.mamba_head_dim}, --mamba-state-dim "
            f"{config.mamba_state_dim}, --mamba-num-groups {config.mamba_num_groups}"
        )
    d_inner = nheads * config.mamba_head_dim
    sizes = (d_inner, d_inner, groups_state, groups_state, nheads)
    values = _ssm_multipliers(config)
    return torch.cat([torch.full((n,), float(v)) for n, v in zip(sizes, values)])


def fc1_output_multipliers(config: TransformerConfig, local_out: int) -> torch.Tensor:
    """Per-channel multipliers of one TP rank's fc1 output: [gate (x mult), up]."""
    if not config.gated_linear_unit:
        raise ValueError(
            "--mlp-multipliers applies its first value to the gate of a gated MLP; it needs "
            "--swiglu (gated_linear_unit)"
        )
    half = local_out // 2
    gate = _mlp_multipliers(config)[0]
    return torch.cat([torch.full((half,), float(gate)), torch.ones(local_out - half)])


class ForwardMultiplierMixin:
    """Mixin for a linear layer class: applies its role's multipliers in ``forward``.

    Must precede the linear class in the MRO. The linear must store ``config`` and return
    ``(output, bias)`` from ``forward`` (Megatron and Transformer Engine linears do).
    """

    multiplier_role: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        role = self.multiplier_role
        self.forward_multipliers_active = not role_is_identity(config, role)
        self._input_multiplier, self._output_multiplier = _role_scalars(config, role)
        vector: Optional[torch.Tensor] = None
        if self.forward_multipliers_active and role in (
            "linear_qkv",
            "mamba_in_proj",
            "linear_fc1",
        ):
            local_out = self._local_output_size()
            tp_size = get_pg_size(getattr(self, "tp_group", None))
            if role == "linear_qkv":
                vector = qkv_output_multipliers(config, local_out, tp_size)
            elif role == "mamba_in_proj":
                vector = mamba_in_proj_output_multipliers(config, local_out, tp_size)
            else:
                vector = fc1_output_multipliers(config, local_out)
            device = self.weight.device if hasattr(self, "weight") else None
            vector = vector.to(device=device, dtype=config.params_dtype)
        # Derived from the config: not part of the state dict or checkpoints.
        self.register_buffer("output_multiplier_vector", vector, persistent=False)

    def _local_output_size(self) -> int:
        for name in ("output_size_per_partition", "out_features"):
            if hasattr(self, name):
                return int(getattr(self, name))
        return int(self.weight.shape[0])

    def _scale_output(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        if self.output_multiplier_vector is not None:
            tensor = tensor * self.output_multiplier_vector.to(tensor.dtype)
        if self._output_multiplier != 1.0:
            tensor = tensor * self._output_multiplier
        return tensor

    def forward(self, input_, *args, **kwargs):
        """Run the linear with its role's input and output multipliers applied."""
        if not self.forward_multipliers_active:
            return super().forward(input_, *args, **kwargs)
        if self._input_multiplier != 1.0:
            input_ = input_ * self._input_multiplier
        output, bias = super().forward(input_, *args, **kwargs)
        return self._scale_output(output), self._scale_output(bias)


_CLASSES: dict[tuple[type, str], type] = {}


def with_forward_multipliers(linear_cls: type, role: str) -> type:
    """Subclass of ``linear_cls`` applying the multipliers of ``role`` (cached per pair).

    The class is published as an attribute of this module under a stable name, so specs that
    hold it can be pickled or referenced by import path.
    """
    if role not in ROLES:
        raise ValueError(f"unknown forward-multiplier role {role!r}; expected one of {ROLES}")
    key = (linear_cls, role)
    if key not in _CLASSES:
        camel = "".join(part.capitalize() for part in role.split("_"))
        name = f"{linear_cls.__name__}With{camel}Multipliers"
        cls = type(
            name,
            (ForwardMultiplierMixin, linear_cls),
            {
                "multiplier_role": role,
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{linear_cls.__name__} applying the '{role}' forward multipliers.",
            },
        )
        setattr(sys.modules[__name__], name, cls)
        _CLASSES[key] = cls
    return _CLASSES[key]


def check_forward_multipliers_applied(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Raise if a layer multiplier is set but no projection of the model can apply it.

    Guards against silently ignoring ``--key-multiplier`` and friends when a model is built from
    a spec whose projections are not multiplier-aware (e.g. upstream's TE hybrid spec).
    """
    roles_present = {
        m.multiplier_role for m in model.modules() if isinstance(m, ForwardMultiplierMixin)
    }
    for field_name, role in LAYER_MULTIPLIER_FIELDS.items():
        value = getattr(config, field_name, None)
        is_set = value is not None and (
            any(v != 1.0 for v in value) if isinstance(value, (list, tuple)) else value != 1.0
        )
        if is_set and role not in roles_present:
            flag = "--" + field_name.replace("_", "-")
            raise ValueError(
                f"{flag} is set, but no layer of this model applies it: the layer spec in use "
                "has no multiplier-aware projections. Use a falcon-mcore hybrid spec (e.g. "
                "--spec megatron.core.models.hybrid.falcon_h1_layer_specs falcon_h1_stack_spec) "
                "or leave the multiplier at 1.0."
            )
