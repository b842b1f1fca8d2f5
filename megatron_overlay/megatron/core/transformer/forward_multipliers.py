# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Non-learnable forward multipliers (Falcon-H1's muP multipliers).

Falcon-H1 scales the inputs and outputs of its projections by fixed numbers from the model
config. :data:`FORWARD_MULTIPLIERS` is the one table of them: each entry is a
``TransformerConfig`` field (its name is also the CLI flag, ``--<name with dashes>``, the HF
``FalconH1Config`` attribute and a checkpoint argument) and the projection role(s) applying it.

The projections apply their role's multipliers themselves (:class:`ForwardMultipliers`, owned
by :class:`ColumnParallelLinearWithMultipliers`, :class:`RowParallelLinearWithMultipliers`, the
Transformer Engine and BitNet linears), so every code path that runs a projection (training, the
memory-efficient and plain Mamba paths, prefill and decode) applies them, and no fused norm +
linear can scale an input before its norm. Layer specs choose these classes and pass the role
as a spec parameter: ``ModuleSpec(module=ColumnParallelLinearWithMultipliers,
params={"role": "linear_qkv"})``.

Roles:

* ``linear_qkv``: input x ``attention_in_multiplier``; key channels x ``key_multiplier``
  (before RoPE, which is linear, so this equals HF's scaling of the key projection; the
  output-gate channels of ``--attention-output-gate`` are not keys and stay unscaled).
* ``linear_proj``: output x ``attention_out_multiplier``.
* ``mamba_in_proj``: input x ``ssm_in_multiplier``; the z / x / B / C / dt segments of the
  output x ``ssm_multipliers`` (HF's ``mup_vector``).
* ``mamba_out_proj``: output x ``ssm_out_multiplier``.
* ``linear_fc1``: gate half of the (gated) fc1 output x ``mlp_multipliers[0]``.
* ``linear_fc2``: output x ``mlp_multipliers[1]``.

Cost. A projection is linear, so its input and output multipliers combine into one scale per
output channel, ``y = s * (x W^T)``, applied in one place: folded into the weight rows
(``x (s W)^T``, a weight-sized elementwise pass instead of an activation-sized one: for training
micro-batches the weight is the smaller operand) where the linear accepts a weight
(``ColumnParallelLinear`` without gradient-accumulation fusion), otherwise one elementwise pass
over the smaller of input and output (a scale that is the same for every channel may act on
the input). With every multiplier at 1.0 a projection does no extra work and is bit-identical
to the plain linear. The scales are plain tensors derived from the config, not buffers: nothing
is saved in checkpoints and CUDA-graph capture, which restores module buffers in place after
warm-up, never touches a tensor that autograd saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

try:  # the Triton row scale of scale_weight; PyTorch's multiply where it is not available
    from megatron.core.fusions.fused_row_scale_triton import row_scaled
except ImportError:
    row_scaled = None

ROLES = ("linear_qkv", "linear_proj", "mamba_in_proj", "mamba_out_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class ForwardMultiplier:
    """One entry of :data:`FORWARD_MULTIPLIERS`.

    Attributes:
        name: the ``TransformerConfig`` field, HF ``FalconH1Config`` attribute and checkpoint
            argument (the CLI flag is ``--`` + name with dashes).
        roles: for each value, the projection role applying it (``None``: the embedding or the
            output layer applies it). A scalar multiplier has one value.
        labels: names of the values of a list multiplier (its CLI metavar).
    """

    name: str
    roles: Tuple[Optional[str], ...]
    labels: Tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Number of values (1 for a scalar)."""
        return len(self.roles)

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    def values(self, config) -> Tuple[float, ...]:
        """The values in ``config`` (a list field left at None means all 1.0)."""
        value = getattr(config, self.name)
        if value is None:
            return (1.0,) * self.count
        if self.count == 1:
            return (float(value),)
        return tuple(float(v) for v in value)

    def is_set(self, config) -> bool:
        """True when some value differs from 1.0."""
        return any(v != 1.0 for v in self.values(config))


FORWARD_MULTIPLIERS: Tuple[ForwardMultiplier, ...] = (
    ForwardMultiplier("embedding_multiplier", (None,)),
    ForwardMultiplier("lm_head_multiplier", (None,)),
    ForwardMultiplier("key_multiplier", ("linear_qkv",)),
    ForwardMultiplier("attention_in_multiplier", ("linear_qkv",)),
    ForwardMultiplier("attention_out_multiplier", ("linear_proj",)),
    ForwardMultiplier("ssm_in_multiplier", ("mamba_in_proj",)),
    ForwardMultiplier("ssm_out_multiplier", ("mamba_out_proj",)),
    ForwardMultiplier("ssm_multipliers", ("mamba_in_proj",) * 5, ("Z", "X", "B", "C", "DT")),
    ForwardMultiplier("mlp_multipliers", ("linear_fc1", "linear_fc2"), ("GATE", "DOWN")),
)
"""Falcon-H1's 9 multiplier fields (14 numbers), in HF's order."""

MULTIPLIERS_BY_NAME: Dict[str, ForwardMultiplier] = {m.name: m for m in FORWARD_MULTIPLIERS}

# Model arguments a checkpoint records and `--use-checkpoint-args` restores: the multipliers,
# the Mamba options Falcon-H1 adds and the padded-vocabulary mask.
MODEL_ARG_NAMES = tuple(m.name for m in FORWARD_MULTIPLIERS) + (
    "mamba_rms_norm",
    "mamba_chunk_size",
    "mamba_conv_kernel",
    "unpadded_vocab_size",
)


def _value(config, name: str, index: int = 0) -> float:
    return MULTIPLIERS_BY_NAME[name].values(config)[index]


def validate_forward_multipliers(config: TransformerConfig) -> None:
    """Check the multiplier and Mamba-shape fields of a config; raise ValueError naming the flag.

    Called from ``TransformerConfig.__post_init__``.
    """
    for mult in FORWARD_MULTIPLIERS:
        value = getattr(config, mult.name)
        if mult.count > 1:
            if value is None:
                continue
            if isinstance(value, (int, float)) or len(value) != mult.count:
                raise ValueError(f"{mult.flag} takes exactly {mult.count} numbers, got {value!r}")
            value = [float(v) for v in value]
            setattr(config, mult.name, value)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, (int, float)) or v != v or v in (float("inf"), -float("inf")):
                what = "a finite number" if mult.count == 1 else "finite numbers"
                raise ValueError(f"{mult.flag} must be {what}, got {value!r}")
    if config.key_multiplier != 1.0 and config.qk_layernorm:
        raise ValueError(
            "--key-multiplier scales keys before RoPE; with --qk-layernorm the key norm would "
            "undo it. Use one or the other."
        )
    if _value(config, "mlp_multipliers", 0) != 1.0 and not config.gated_linear_unit:
        raise ValueError("--mlp-multipliers GATE needs a gated MLP (--swiglu)")
    if config.mamba_chunk_size <= 0:
        raise ValueError(f"--mamba-chunk-size must be positive, got {config.mamba_chunk_size}")
    if config.mamba_conv_kernel < 1:
        raise ValueError(f"--mamba-conv-kernel must be >= 1, got {config.mamba_conv_kernel}")


# --------------------------------------------------------------------------------------------
# Per-role scales


def fused_qkv_group_layout(config: TransformerConfig) -> Tuple[Tuple[str, int], ...]:
    """``(name, rows)`` of the logical matrices in one query group of Megatron's fused QKV.

    Upstream ``SelfAttention`` lays the fused QKV output out per query group: the group's query
    heads, then (with ``attention_output_gate``) as many output-gate heads, then its key head,
    then its value head, each ``kv_channels`` wide. Names: ``q``, ``gate``, ``k``, ``v``.
    """
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels
    if head_dim is None or heads % groups != 0:
        raise ValueError(
            f"fused QKV layout needs --kv-channels and --num-attention-heads ({heads}) divisible "
            f"by --num-query-groups ({groups})"
        )
    query_rows = heads // groups * head_dim
    gate = (("gate", query_rows),) if config.attention_output_gate else ()
    return (("q", query_rows),) + gate + (("k", head_dim), ("v", head_dim))


def qkv_output_multipliers(
    config: TransformerConfig, local_out: int, tp_size: int, tp_rank: Optional[int] = None
) -> torch.Tensor:
    """Per-channel multipliers of one TP rank's fused QKV output (key channels x key_mult).

    The fused output is :func:`fused_qkv_group_layout` repeated once per query group, split
    evenly over the TP ranks: with ``tp_size`` dividing the query groups a rank holds whole
    groups; with more ranks than groups (upstream's attention all-gathers the QKV output then)
    a rank holds a slice of one group, which ``tp_rank`` locates.
    """
    groups = config.num_query_groups
    layout = fused_qkv_group_layout(config)
    group_width = sum(rows for _, rows in layout)
    key = float(config.key_multiplier)
    group = torch.cat([torch.full((rows,), key if name == "k" else 1.0) for name, rows in layout])
    if groups % tp_size == 0:
        if local_out % group_width != 0:
            raise ValueError(
                f"fused QKV output of {local_out} channels per rank is not a whole number of "
                f"query groups of width {group_width} ({', '.join(n for n, _ in layout)}); "
                "cannot place --key-multiplier"
            )
        return group.repeat(local_out // group_width)
    if tp_size % groups != 0:
        raise ValueError(
            f"--num-query-groups ({groups}) must divide or be a multiple of the "
            f"tensor-parallel size ({tp_size})"
        )
    if tp_rank is None:
        raise ValueError(
            f"--key-multiplier with more tensor-parallel ranks ({tp_size}) than query groups "
            f"({groups}) needs the rank of the layer's projection; this layer does not give it"
        )
    full = group.repeat(groups)
    if local_out * tp_size != full.numel():
        raise ValueError(
            f"fused QKV output of {local_out} channels per rank x {tp_size} ranks does not match "
            f"{groups} query groups of width {group_width}; cannot place --key-multiplier"
        )
    return full[tp_rank * local_out : (tp_rank + 1) * local_out].clone()


def mamba_in_proj_output_multipliers(
    config: TransformerConfig, local_out: int, tp_size: int
) -> torch.Tensor:
    """Per-channel multipliers of one TP rank's Mamba in_proj output [z, x, B, C, dt].

    Each of the five components is split evenly over the TP ranks (B and C: the rank's share of
    the groups' channels, a slice of one group where the model runs more ranks than groups).
    """
    groups_state, remainder = divmod(config.mamba_num_groups * config.mamba_state_dim, tp_size)
    if remainder != 0:
        raise ValueError(
            f"the Mamba B / C channels (--mamba-num-groups {config.mamba_num_groups} x "
            f"--mamba-state-dim {config.mamba_state_dim}) do not split evenly over "
            f"--tensor-model-parallel-size {tp_size}"
        )
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
    values = MULTIPLIERS_BY_NAME["ssm_multipliers"].values(config)
    return torch.cat([torch.full((n,), v) for n, v in zip(sizes, values)])


def fc1_output_multipliers(config: TransformerConfig, local_out: int) -> torch.Tensor:
    """Per-channel multipliers of one TP rank's fc1 output: [gate (x mult), up]."""
    if not config.gated_linear_unit:
        raise ValueError(
            "--mlp-multipliers applies its first value to the gate of a gated MLP; it needs "
            "--swiglu (gated_linear_unit)"
        )
    half = local_out // 2
    gate = _value(config, "mlp_multipliers", 0)
    return torch.cat([torch.full((half,), gate), torch.ones(local_out - half)])


def role_scalars(config: TransformerConfig, role: str) -> Tuple[float, float]:
    """(input multiplier, scalar output multiplier) of a role."""
    if role == "linear_qkv":
        return config.attention_in_multiplier, 1.0
    if role == "linear_proj":
        return 1.0, config.attention_out_multiplier
    if role == "mamba_in_proj":
        return config.ssm_in_multiplier, 1.0
    if role == "mamba_out_proj":
        return 1.0, config.ssm_out_multiplier
    if role == "linear_fc1":
        return 1.0, 1.0
    if role == "linear_fc2":
        return 1.0, _value(config, "mlp_multipliers", 1)
    raise ValueError(f"unknown forward-multiplier role {role!r}; expected one of {ROLES}")


def role_is_identity(config: TransformerConfig, role: str) -> bool:
    """True when every multiplier of ``role`` is 1.0 for this config."""
    for mult in FORWARD_MULTIPLIERS:
        for value, value_role in zip(mult.values(config), mult.roles):
            if value_role == role and value != 1.0:
                return False
    if role not in ROLES:
        raise ValueError(f"unknown forward-multiplier role {role!r}; expected one of {ROLES}")
    return True


class ForwardMultipliers:
    """The multipliers one projection applies, as scales of its input and output channels.

    ``y = (x * input) W^T * output``, where ``input`` is a number and ``output`` one number per
    output channel of this rank (the role's scalar output multiplier times its per-channel
    multipliers). A linear map lets both act on the output (``combined``) or on the weight rows.
    Derived from the config (nothing to save); vectors are kept in fp32, with a cached copy per
    (device, dtype) they are used in.

    Args:
        config: model config.
        role: one of :data:`ROLES`.
        local_out: output channels of this rank.
        tp_size: tensor-parallel size (the per-channel layouts are per rank).
        device: where to keep the vectors.
        tp_rank: this rank in the tensor-parallel group (needed to place the key multiplier
            when a query group is split over several ranks).
    """

    def __init__(
        self,
        config: TransformerConfig,
        role: str,
        local_out: int,
        tp_size: int,
        device=None,
        tp_rank: Optional[int] = None,
    ):
        self.role = role
        self.identity = role_is_identity(config, role)
        input_mult, output_mult = role_scalars(config, role)
        channels: Optional[torch.Tensor] = None
        if not self.identity:
            if role == "linear_qkv" and config.key_multiplier != 1.0:
                channels = qkv_output_multipliers(config, local_out, tp_size, tp_rank)
            elif role == "mamba_in_proj":
                channels = mamba_in_proj_output_multipliers(config, local_out, tp_size)
            elif role == "linear_fc1":
                channels = fc1_output_multipliers(config, local_out)
        #: Scale of the input (a number).
        self.input = float(input_mult)
        #: Scale of every output channel: a number, or None when ``output_vector`` is set.
        self.output = float(output_mult)
        self.output_vector: Optional[torch.Tensor] = None
        self.combined = self.input * self.output
        self.combined_vector: Optional[torch.Tensor] = None
        if channels is not None:
            channels = channels.double().to(device)
            self.output_vector = (channels * self.output).float()
            self.combined_vector = (channels * self.combined).float()
        self._cast: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        #: The step runs under CUDA graphs (``cuda_graph_impl``): per-channel folds take Triton.
        self.graphed = config.cuda_graph_impl != "none"

    def _as(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (id(vector), like.device, like.dtype)
        cached = self._cast.get(key)
        if cached is None:
            cached = vector.to(device=like.device, dtype=like.dtype)
            self._cast[key] = cached
        return cached

    def scale_input(self, input_: torch.Tensor) -> torch.Tensor:
        """``input_ * input`` (the tensor itself when the scale is 1)."""
        return input_ if self.input == 1.0 else input_ * self.input

    def scale_output(
        self, output: Optional[torch.Tensor], with_input: bool = True
    ) -> Optional[torch.Tensor]:
        """``output`` (channels last) times the output scale, and the input scale unless
        ``with_input`` is False (for a layer that scaled its input itself). None stays None."""
        if output is None or self.identity:
            return output
        vector = self.combined_vector if with_input else self.output_vector
        if vector is not None:
            return output * self._as(vector, output)
        scalar = self.combined if with_input else self.output
        return output if scalar == 1.0 else output * scalar

    def scale_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with input and output scales folded into its rows (``x (s W)^T``).

        Per-channel scales of a 2-D CUDA weight take one Triton pass each way under CUDA graphs
        (``megatron.core.fusions.fused_row_scale_triton``, same bits as the PyTorch product).
        """
        if self.combined_vector is None:
            return weight * self.combined
        scale = self._as(self.combined_vector, weight)
        if _row_scale_in_triton(weight, self.graphed):
            return row_scaled(weight, scale)
        return weight * scale.unsqueeze(1)

    def __repr__(self) -> str:
        if self.identity:
            return f"ForwardMultipliers(role={self.role!r}, identity)"
        out = "per-channel" if self.output_vector is not None else f"{self.output:g}"
        return f"ForwardMultipliers(role={self.role!r}, input={self.input:g}, output={out})"


def _row_scale_in_triton(weight: torch.Tensor, graphed: bool) -> bool:
    """True when ``scale_weight`` scales ``weight``'s rows with the Triton kernel: a 2-D CUDA
    weight where the kernel is available, in a step run under CUDA graphs (``graphed``: a Triton
    launch costs the host more than PyTorch's, paid once at capture with graphs, every step
    without). Elsewhere PyTorch's broadcasting multiply, same bits."""
    return graphed and row_scaled is not None and weight.is_cuda and weight.dim() == 2


def _tokens(input_: torch.Tensor) -> int:
    return input_.numel() // max(input_.shape[-1], 1)


class ColumnParallelLinearWithMultipliers(ColumnParallelLinear):
    """``ColumnParallelLinear`` applying the forward multipliers of its ``role``.

    Same constructor as the parent plus ``role`` (one of :data:`ROLES`). Where the input has more
    tokens than the layer has input features (training micro-batches), the scale is folded into
    the weight rows; otherwise (decode steps, a caller-supplied weight, gradient-accumulation
    fusion, which needs the parameter itself, or a bias) it multiplies the output.
    """

    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        if self.gather_output:
            raise NotImplementedError(
                f"{type(self).__name__}: forward multipliers of a gathered output "
                "(gather_output=True) are not supported"
            )
        self.forward_multipliers = ForwardMultipliers(
            self.config,
            role,
            self.output_size_per_partition,
            get_pg_size(self.tp_group),
            device=None if self.weight is None else self.weight.device,
            tp_rank=get_pg_rank(self.tp_group),
        )

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ):
        """Forward of the parent with the role's multipliers applied."""
        fm = self.forward_multipliers
        if fm.identity:
            return super().forward(input_, weight, runtime_gather_output)
        if runtime_gather_output:
            raise NotImplementedError("forward multipliers of a gathered output")
        if (
            weight is None
            and self.bias is None
            and not self.gradient_accumulation_fusion
            and _tokens(input_) > self.input_size
        ):
            return super().forward(input_, fm.scale_weight(self.weight), runtime_gather_output)
        output, bias = super().forward(input_, weight, runtime_gather_output)
        return fm.scale_output(output), fm.scale_output(bias)


class RowParallelLinearWithMultipliers(RowParallelLinear):
    """``RowParallelLinear`` applying the forward multipliers of its ``role``.

    Same constructor as the parent plus ``role``. Row-parallel roles scale every channel alike,
    so the scale acts on the smaller of the (local) input and the output.
    """

    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_multipliers = ForwardMultipliers(
            self.config, role, self.output_size, get_pg_size(self.tp_group)
        )
        if self.forward_multipliers.output_vector is not None:
            raise ValueError(f"row-parallel role {role!r} has per-channel multipliers")

    def forward(self, input_: torch.Tensor):
        """Forward of the parent with the role's multipliers applied."""
        fm = self.forward_multipliers
        if fm.identity:
            return super().forward(input_)
        if self.bias is None and input_.shape[-1] < self.output_size:
            return super().forward(input_ * fm.combined)
        output, bias = super().forward(input_)
        return fm.scale_output(output), fm.scale_output(bias)


def check_forward_multipliers_applied(
    models, config: Optional[TransformerConfig] = None, group=None
) -> None:
    """Raise if a layer multiplier is set but no projection of the whole model applies it.

    Guards against silently ignoring ``--key-multiplier`` and friends when a model is built from
    a spec whose projections are not multiplier-aware (upstream's GPT specs, the TE hybrid spec).

    Args:
        models: the module, or every model chunk this rank holds (virtual pipeline stages).
        config: the model's config (default: the first chunk's ``config``).
        group: the process group whose ranks together hold the whole model (the pipeline
            group). The roles present are OR-reduced over it, so a pipeline stage without, say,
            attention layers does not raise while another stage applies ``--key-multiplier``;
            every rank raises, or none. The collective runs only when a layer multiplier is
            set (all ranks share the config), so default models do no extra communication.

    Training calls this once all model chunks are built (``get_model`` and
    ``unimodal_build_distributed_models``), for every model type.
    """
    if isinstance(models, torch.nn.Module):
        models = [models]
    if config is None:
        config = getattr(models[0], "config", None) if models else None
    flagged = []
    for mult in FORWARD_MULTIPLIERS:
        for value, role in zip(mult.values(config), mult.roles):
            if role is not None and value != 1.0 and (mult, role) not in flagged:
                flagged.append((mult, role))
    if not flagged:
        return
    present = torch.zeros(len(ROLES), dtype=torch.int32)
    for model in models:
        for module in model.modules():
            multipliers = getattr(module, "forward_multipliers", None)
            if isinstance(multipliers, ForwardMultipliers):
                present[ROLES.index(multipliers.role)] = 1
    if (
        group is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(group) > 1
    ):
        if torch.distributed.get_backend(group) == "nccl":
            present = present.to(torch.cuda.current_device())
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX, group=group)
        present = present.cpu()
    roles_present = {role for role, flag in zip(ROLES, present.tolist()) if flag}
    for mult, role in flagged:
        if role not in roles_present:
            raise ValueError(
                f"{mult.flag} is set, but no layer of this model applies it: the layer spec in "
                "use has no multiplier-aware projections (upstream's GPT and Transformer Engine "
                "hybrid specs have none). Use a Falcon-H1 hybrid spec (e.g. --spec "
                "megatron.core.models.hybrid.falcon_h1_layer_specs falcon_h1_stack_spec) or "
                "leave the multiplier at 1.0."
            )
