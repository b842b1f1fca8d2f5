# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet b1.58 tensor-parallel linear layers for Megatron Core.

:class:`BitNetColumnParallelLinear` and :class:`BitNetRowParallelLinear` are drop-in
replacements of :class:`~megatron.core.tensor_parallel.layers.ColumnParallelLinear` /
:class:`~megatron.core.tensor_parallel.layers.RowParallelLinear` (same constructor, same
``(output, bias)`` forward) that compute ``y = x_q W_q^T (+ b)`` with ternary weights and int8
per-token activations (BitNet b1.58) and identity straight-through gradients to the
full-precision weight and input (:func:`megatron.core.bitnet.functional.bitnet_linear`).

Tensor-parallel invariance
--------------------------
The quantisation of a TP shard equals the corresponding part of the quantisation of the full
(TP=1) weight:

* ``beta`` is the mean of ``|W|`` over each *logical* matrix across all TP ranks: local fp64 abs
  sums per segment -> all-reduce SUM over the TP group -> divided by the global element count
  of the segment.  Segments follow the layer's :attr:`bitnet_role`:

  - ``"linear_qkv"``: q, k, v (Megatron's per-query-group layout: for every local query group
    ``heads_per_group * kv_channels`` q rows, ``kv_channels`` k rows, ``kv_channels`` v rows);
    with ``attention_output_gate`` a fourth matrix, the output gate (``heads_per_group *
    kv_channels`` rows between q and k of every group, see
    :func:`~megatron.core.transformer.forward_multipliers.fused_qkv_group_layout`);
  - ``"linear_fc1"`` with ``config.gated_linear_unit``: gate (first half of the local rows) and
    up (second half) -- Megatron stores each rank's shard of gate and of up in that order;
  - anything else: one segment, the whole logical weight (a scalar beta).

  With several segments beta is a per-output-row vector (see :mod:`.quant`).
* ``gamma`` (per-token absmax) is taken over the full hidden row: column-parallel inputs are
  complete rows (gathered first under sequence parallelism); a row-parallel layer all-reduces
  (MAX) the local absmax over the TP group before quantising.

So at TP>1 the integer operands and all scales are identical to TP=1; a column-parallel output
is bit-identical, a row-parallel output differs only by the fp32 order of the final TP
reduction (partial products are summed across ranks instead of inside one GEMM).

Weight cache and the training loop
----------------------------------
Each layer quantises its weight once per optimizer step through a
:class:`~megatron.core.bitnet.functional.BitNetWeightCache`; the cross-rank reductions of
``beta`` run only on cache misses.  Misses must happen on all ranks of the TP group together
(they contain collectives), which holds because every invalidation is rank-symmetric: a
cache drops its quantisation after every ``torch.optim`` step (a step post-hook that lives as
long as the cache, so any loop that steps a Megatron optimizer refreshes it, see
:class:`~megatron.core.bitnet.functional.BitNetWeightCache`) and after ``load_state_dict`` (a
post-hook of each layer).  In-place updates through the parameter itself are also detected
through ``weight._version``.  Code that writes the weights any other way (``param.data``, the
parameter buffer, a weight refit) calls
:func:`megatron.core.bitnet.functional.invalidate_weight_caches` on the model.

Optional input RMSNorm
----------------------
``config.bitnet_rms_norm = True`` adds a learnable RMSNorm on the layer input before the
activation quantisation, like HF transformers' ``AutoBitLinear(use_rms_norm=True)`` /
``BitLinear(use_rms_norm=True)`` (``integrations/bitnet.py``), which use ``LlamaRMSNorm``:
``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)`` with ``x32 = fp32(x)``, a weight of
``in_features`` elements initialised to ones, and ``eps = quantization_config.rms_norm_eps``
(default ``1e-6``; read here from ``config.bitnet_rms_norm_eps``, default ``1e-6``).  It lives in
the submodule ``rms_norm`` (state-dict key ``<layer>.rms_norm.weight``, HF's name).  The norm is
over the full hidden row: in a row-parallel layer the sum of squares is all-reduced over the
TP group and the norm weight is TP-sharded like the input; in a column-parallel layer the norm
runs before the TP region (its weight is replicated; under sequence parallelism its gradient
is summed over the TP group by Megatron's ``finalize_model_grads`` through the
``sequence_parallel`` attribute, as for layer norms).  The sum of squares is accumulated in fp64,
so the result does not depend on the TP size (HF accumulates the mean in fp32; the two agree
to fp32 rounding).

Not supported (a clear error at construction): MoE expert layers (``is_expert=True``),
``delay_wgrad_compute``, fp8 / fp4, ``defer_embedding_wgrad_compute``, generalized TP
rematerialisation, and the RMSNorm together with ``disable_grad_reduce``.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import layers as _tp_layers
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_size

from . import functional as F
from .functional import BitNetWeightCache, QuantizedWeight

__all__ = [
    "BitNetInputRMSNorm",
    "BitNetLinearMixin",
    "BitNetColumnParallelLinear",
    "BitNetRowParallelLinear",
    "bitnet_weight_segments",
]


# --------------------------------------------------------------------------------------------
# Segments (logical matrices inside one Megatron weight)
# --------------------------------------------------------------------------------------------


def bitnet_weight_segments(
    role: str, config: ModelParallelConfig, local_rows: int
) -> Tuple[Tuple[str, ...], Optional[Tuple[int, ...]]]:
    """Logical matrices of one rank's weight rows for a BitNet role.

    Args:
        role: the layer's ``bitnet_role``.
        config: the layer config (attention / MLP shape fields are read).
        local_rows: output rows of this rank's weight.

    Returns:
        ``(names, pattern)``: segment names (e.g. ``("q", "k", "v")``) and the segment index of
        each row of one repeating block of rows (``None`` for a single segment).  The block
        repeats ``local_rows // len(pattern)`` times (once per local query group for QKV).
    """
    if role == "linear_qkv":
        from megatron.core.transformer.forward_multipliers import fused_qkv_group_layout

        layout = fused_qkv_group_layout(config)
        pattern = tuple(i for i, (_, rows) in enumerate(layout) for _ in range(rows))
        names = tuple(name for name, _ in layout)
        if local_rows % len(pattern) != 0:
            raise ValueError(
                f"BitNet linear_qkv: {local_rows} output rows per rank are not whole query groups "
                f"of {len(pattern)} rows ({' + '.join(f'{n} {r}' for n, r in layout)}); cannot "
                f"separate the {' / '.join(names)} scales"
            )
        return names, pattern
    if role == "linear_fc1" and getattr(config, "gated_linear_unit", False):
        if local_rows % 2 != 0:
            raise ValueError(
                f"BitNet gated linear_fc1 needs an even number of output rows per rank, got "
                f"{local_rows}"
            )
        half = local_rows // 2
        return ("gate", "up"), (0,) * half + (1,) * half
    return ("weight",), None


# --------------------------------------------------------------------------------------------
# Optional input RMSNorm
# --------------------------------------------------------------------------------------------


class BitNetInputRMSNorm(torch.nn.Module):
    """RMSNorm over the full hidden row of a (possibly TP-sharded) input, HF-LlamaRMSNorm style.

    ``y = weight * (x32 * rsqrt(sum(x32**2) / hidden + eps)).to(x.dtype)``, ``x32 = fp32(x)``,
    with the sum of squares accumulated in fp64.

    Args:
        local_size: size of the last input dimension on this rank (= the weight's size).
        full_size: size of the full hidden row (``local_size * tp`` when ``partitioned``).
        eps: epsilon added to the mean square.
        partitioned: the hidden dimension is split over ``tp_group``: the sum of squares is
            all-reduced (autograd-aware, gradients summed back) over it.
        tp_group: tensor-parallel group.
        dtype / device: of the weight (initialised to ones).
    """

    def __init__(
        self,
        local_size: int,
        full_size: int,
        eps: float,
        partitioned: bool,
        tp_group: Optional[dist.ProcessGroup],
        dtype: torch.dtype,
        device=None,
    ):
        super().__init__()
        self.local_size = local_size
        self.full_size = full_size
        self.eps = float(eps)
        self.partitioned = partitioned
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(torch.ones(local_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x [..., local_size]``."""
        x32 = x.to(torch.float32)
        sum_sq = x32.square().sum(dim=-1, keepdim=True, dtype=torch.float64)
        if self.partitioned and get_pg_size(self.tp_group) > 1:
            # forward: all-reduce SUM; backward: all-reduce SUM of the per-rank gradients
            # (each rank's outputs depend on the global sum).
            sum_sq = reduce_from_tensor_model_parallel_region(
                copy_to_tensor_model_parallel_region(sum_sq, group=self.tp_group),
                group=self.tp_group,
            )
        var = (sum_sq / float(self.full_size)).to(torch.float32)
        normed = x32 * torch.rsqrt(var + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        """Sizes, epsilon and partitioning in the module printout."""
        return (
            f"local_size={self.local_size}, full_size={self.full_size}, eps={self.eps}, "
            f"partitioned={self.partitioned}"
        )


# --------------------------------------------------------------------------------------------
# Shared BitNet machinery
# --------------------------------------------------------------------------------------------


def _check_supported(layer_name: str, config: ModelParallelConfig, is_expert: bool) -> None:
    """Raise for options the BitNet linears do not implement (never fall back silently)."""
    if is_expert:
        raise NotImplementedError(
            f"{layer_name}: BitNet tensor-parallel linears do not support MoE expert layers "
            "(is_expert=True); use non-expert MLPs or a non-BitNet expert spec"
        )
    if getattr(config, "delay_wgrad_compute", False):
        raise NotImplementedError(
            f"{layer_name}: delay_wgrad_compute (--delay-wgrad-compute) is not supported by "
            "BitNet linears"
        )
    if getattr(config, "fp8", None):
        raise NotImplementedError(
            f"{layer_name}: fp8 (--fp8-format {config.fp8}) cannot be combined with BitNet "
            "(ternary weights / int8 activations)"
        )
    if getattr(config, "fp4", None):
        raise NotImplementedError(
            f"{layer_name}: fp4 (--fp4-format {config.fp4}) cannot be combined with BitNet"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise NotImplementedError(
            f"{layer_name}: defer_embedding_wgrad_compute (--defer-embedding-wgrad-compute) is "
            "not supported by BitNet linears"
        )


def _config_for_parent(config: ModelParallelConfig) -> ModelParallelConfig:
    """Config handed to Megatron's constructor.

    ColumnParallelLinear refuses ``gradient_accumulation_fusion`` without apex's
    ``fused_weight_gradient_mlp_cuda``; the BitNet autograd function accumulates into
    ``main_grad`` itself, so the parent gets a shallow copy with the flag off (the layer keeps
    and uses the real config).
    """
    if config.gradient_accumulation_fusion and not _tp_layers._grad_accum_fusion_available:
        parent = copy.copy(config)
        parent.gradient_accumulation_fusion = False
        return parent
    return config


def _invalidate_after_load(layer: torch.nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the loaded weight needs a fresh quantisation."""
    layer.bitnet_weight_cache.invalidate()


class BitNetLinearMixin:
    """BitNet state and scale computation shared by the column- and row-parallel layers.

    The layer must have ``config``, ``tp_group`` and ``weight`` (or receive the weight in
    ``forward``). Its ``bitnet_role`` (the constructor's ``role``: ``"linear_qkv"``,
    ``"linear_fc1"``, ... or ``""``) decides the beta segments; with ``multipliers=True`` it
    also applies that role's forward multipliers
    (:class:`megatron.core.transformer.forward_multipliers.ForwardMultipliers`) to the BitNet
    product. They are folded into the weight scale (``output_scale`` of
    :func:`~megatron.core.bitnet.functional.bitnet_linear`, once per optimizer step) instead of
    multiplying the activations and their gradients: the output multipliers always, the input
    multiplier too when no BitNet RMSNorm follows it (per-token absmax quantisation is
    scale-invariant: ``x_q(c x) = c x_q(x)``). A bias added inside the product (not
    ``skip_bias_add``) keeps the unfolded order ``(x W^T + b) * output``.

    Kernel settings come from the config and are passed to every op: ``bitnet_backend``
    (``--bitnet-backend``), ``bitnet_dgrad`` / ``bitnet_wgrad`` (``--bitnet-dgrad`` /
    ``--bitnet-wgrad``, the backward GEMMs of the triton backend) and ``bitnet_weight_cache``
    (``--no-bitnet-weight-cache``: re-quantise on every call).
    """

    def _bitnet_setup(
        self, config: ModelParallelConfig, local_rows: int, role: str, multipliers: bool
    ) -> None:
        if getattr(self, "gtp_remat_size", 1) > 1:
            raise NotImplementedError(
                f"{type(self).__name__}: generalized tensor-parallel rematerialisation is not "
                "supported by BitNet linears"
            )
        # Restore the real config (the parent may have seen a copy, see _config_for_parent).
        self.config = config
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        self.bitnet_backend = config.bitnet_backend
        self.bitnet_dgrad = config.bitnet_dgrad
        self.bitnet_wgrad = config.bitnet_wgrad
        self.bitnet_weight_cache = BitNetWeightCache(
            enabled=config.bitnet_weight_cache,
            reuse_in_capture=getattr(config, "cuda_graph_impl", "none") == "full_iteration",
        )
        self.register_load_state_dict_post_hook(_invalidate_after_load)
        if not isinstance(role, str) or (role and not role.isidentifier()):
            raise ValueError(f"bitnet role must be an identifier string or '', got {role!r}")
        self.bitnet_role = role
        self.forward_multipliers = None
        if multipliers:
            from megatron.core.transformer.forward_multipliers import ForwardMultipliers

            self.forward_multipliers = ForwardMultipliers(
                config, role, local_rows, get_pg_size(self.tp_group)
            )
        self._bitnet_fold_scales: Dict[Tuple[torch.device, bool], Optional[torch.Tensor]] = {}
        names, pattern = bitnet_weight_segments(role, config, local_rows)
        self.bitnet_segment_names: Tuple[str, ...] = names
        self._bitnet_pattern = pattern
        self._bitnet_local_rows = local_rows
        self._bitnet_segment_ids: Dict[torch.device, torch.Tensor] = {}

    def _scale_outputs(self, output, output_bias):
        """``(output, bias)`` times the output multipliers (when the layer applies them)."""
        multipliers = self.forward_multipliers
        if multipliers is None:
            return output, output_bias
        return (
            multipliers.scale_output(output, with_input=False),
            multipliers.scale_output(output_bias, with_input=False),
        )

    def _folds_multipliers(self, bias_in_product: bool) -> bool:
        """Whether the forward multipliers ride in the weight scale (see the class docstring)."""
        fm = self.forward_multipliers
        return fm is not None and not fm.identity and not bias_in_product

    def _folded_input(self) -> bool:
        """Whether a folded scale also carries the input multiplier (no RMSNorm after it)."""
        return self.rms_norm is None

    def _fold_scale(self, device: torch.device) -> Optional[torch.Tensor]:
        """The multipliers as an fp32 scale of this rank's output channels on ``device`` (one
        number or one per channel; None when it is 1), made once per device: the weight
        cache is keyed by this tensor."""
        with_input = self._folded_input()
        key = (device, with_input)
        if key not in self._bitnet_fold_scales:
            fm = self.forward_multipliers
            vector = fm.combined_vector if with_input else fm.output_vector
            scale = None
            if vector is not None:
                scale = vector.to(device=device, dtype=torch.float32)
            else:
                value = fm.combined if with_input else fm.output
                if value != 1.0:
                    scale = torch.tensor(value, dtype=torch.float32, device=device)
            self._bitnet_fold_scales[key] = scale
        return self._bitnet_fold_scales[key]

    def _prepare_fold_scale(self) -> None:
        """Make the folded scale on the parameters' device now, outside any CUDA-graph capture
        (a host-to-device copy cannot be captured)."""
        fm = self.forward_multipliers
        if fm is not None and not fm.identity:
            self._fold_scale(_param_device(self))

    def _scale_input(self, x: torch.Tensor, fold: bool) -> torch.Tensor:
        """``x`` times the input multiplier unless a folded scale carries it."""
        if self.forward_multipliers is None or (fold and self._folded_input()):
            return x
        return self.forward_multipliers.scale_input(x)

    # -- scales --------------------------------------------------------------------------

    def _segment_ids(self, device: torch.device) -> torch.Tensor:
        """Row -> segment index (long ``[local_rows]``) on ``device``, built there (no copy)."""
        ids = self._bitnet_segment_ids.get(device)
        if ids is None:
            block = len(self._bitnet_pattern)
            pos = torch.arange(self._bitnet_local_rows, device=device) % block
            ids = torch.zeros_like(pos)
            # segment boundaries inside the repeating block
            for i in range(1, block):
                if self._bitnet_pattern[i] != self._bitnet_pattern[i - 1]:
                    ids += (pos >= i).to(ids.dtype)
            self._bitnet_segment_ids[device] = ids
        return ids

    def bitnet_weight_scale(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``beta`` of this rank's weight rows, computed over the full logical matrices.

        Runs the TP all-reduce; call on all ranks of the TP group together.  Returns a 0-dim
        fp32 scale (one segment) or a per-row fp32 vector ``[local_rows]``.
        """
        weight = self.weight if weight is None else weight
        tp = get_pg_size(self.tp_group)
        with torch.no_grad():
            if self._bitnet_pattern is None:
                sums = F.weight_abs_sum(weight, self.bitnet_backend)
                if tp > 1:
                    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.tp_group)
                return F.weight_scale_from_abs_sum(sums, weight.numel() * tp)
            ids = self._segment_ids(weight.device)
            nseg = len(self.bitnet_segment_names)
            rows = F.weight_row_abs_sums(weight, self.bitnet_backend)
            sums = F.segment_sums(rows, ids, nseg)
            if tp > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.tp_group)
            cols = weight.shape[1]
            rows_per_seg = [0] * nseg
            for seg in self._bitnet_pattern:
                rows_per_seg[seg] += 1
            repeats = self._bitnet_local_rows // len(self._bitnet_pattern)
            counts = [r * repeats * cols * tp for r in rows_per_seg]
            beta_seg = F.weight_scale_from_abs_sum(sums, counts)
            return F.expand_segment_scales(beta_seg, ids)

    def bitnet_quantized_weight(self, weight: Optional[torch.Tensor] = None) -> QuantizedWeight:
        """This rank's ``(T, beta)`` through the layer's per-step cache (collective on a miss)."""
        weight = self.weight if weight is None else weight
        return F.get_quantized_weight(
            weight,
            cache=self.bitnet_weight_cache,
            beta_fn=self.bitnet_weight_scale,
            backend=self.bitnet_backend,
        )

    def bitnet_segment_betas(self) -> Dict[str, torch.Tensor]:
        """``{segment name: 0-dim beta}`` of the logical matrices in this weight (e.g. for
        export: HF stores one scale per q / k / v / gate / up projection).  The values are the
        global (all-rank) scales, so every TP rank returns the same numbers."""
        beta = self.bitnet_quantized_weight().beta
        if beta.dim() == 0:
            return {name: beta for name in self.bitnet_segment_names}
        first_row = {}
        for row, seg in enumerate(self._bitnet_pattern):
            first_row.setdefault(seg, row)
        return {name: beta[first_row[i]] for i, name in enumerate(self.bitnet_segment_names)}

    def _bitnet_matmul(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        gamma: Optional[torch.Tensor] = None,
        fold: bool = False,
    ) -> torch.Tensor:
        return F.bitnet_linear(
            x,
            weight,
            bias,
            gamma=gamma,
            output_scale=self._fold_scale(x.device) if fold else None,
            weight_cache=self.bitnet_weight_cache,
            weight_scale_fn=self.bitnet_weight_scale,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            backend=self.bitnet_backend,
            dgrad=self.bitnet_dgrad,
            wgrad=self.bitnet_wgrad,
        )

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation is not supported (rejected at construction)."""


def _rms_norm_eps(config: ModelParallelConfig) -> float:
    return float(getattr(config, "bitnet_rms_norm_eps", 1e-6))


def _param_device(layer: torch.nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    if weight is not None:
        return weight.device
    from megatron.core.device_utils import get_current_device

    return torch.device(get_current_device())


# --------------------------------------------------------------------------------------------
# Column parallel
# --------------------------------------------------------------------------------------------


class BitNetColumnParallelLinear(BitNetLinearMixin, ColumnParallelLinear):
    """BitNet b1.58 :class:`ColumnParallelLinear` (output rows split over TP ranks).

    Same constructor and forward contract as the parent.  The input is a complete row per
    token (copied to the TP region, or gathered along the sequence under sequence
    parallelism), so only the weight scale needs a TP reduction (per segment, see the module
    docstring).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer: Optional[List[torch.Tensor]] = None,
        grad_output_buffer: Optional[List[torch.Tensor]] = None,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        disable_grad_reduce: bool = False,
        tp_group: Optional[dist.ProcessGroup] = None,
        name: Optional[str] = None,
        role: str = "",
        multipliers: bool = False,
    ):
        _check_supported(type(self).__name__, config, is_expert)
        use_rms_norm = bool(getattr(config, "bitnet_rms_norm", False))
        if use_rms_norm and disable_grad_reduce:
            raise NotImplementedError(
                f"{type(self).__name__}: bitnet_rms_norm with disable_grad_reduce=True is not "
                "supported (the norm weight's gradient would stay partial)"
            )
        super().__init__(
            input_size,
            output_size,
            config=_config_for_parent(config),
            init_method=init_method,
            bias=bias,
            gather_output=gather_output,
            stride=stride,
            keep_master_weight_for_test=keep_master_weight_for_test,
            skip_bias_add=skip_bias_add,
            skip_weight_param_allocation=skip_weight_param_allocation,
            embedding_activation_buffer=embedding_activation_buffer,
            grad_output_buffer=grad_output_buffer,
            is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name,
            disable_grad_reduce=disable_grad_reduce,
            tp_group=tp_group,
            name=name,
        )
        self._bitnet_setup(config, self.output_size_per_partition, role, multipliers)
        self.rms_norm: Optional[BitNetInputRMSNorm] = None
        if use_rms_norm:
            self.rms_norm = BitNetInputRMSNorm(
                input_size,
                input_size,
                _rms_norm_eps(config),
                partitioned=False,
                tp_group=self.tp_group,
                dtype=config.params_dtype,
                device=_param_device(self),
            )
            # Replicated over TP.  Without sequence parallelism its gradient is complete on
            # every rank (the norm runs before copy_to_tensor_model_parallel_region, whose
            # backward all-reduces); with it, each rank normalises only its tokens and
            # finalize_model_grads sums the gradient over TP (the layer-norm convention).
            setattr(self.rms_norm.weight, "sequence_parallel", self.sequence_parallel)
        self._prepare_fold_scale()

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """BitNet column-parallel forward.

        Args:
            input_: ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism) or any
                ``[..., h]``.
            weight: weight to use instead of ``self.weight`` (required with
                ``skip_weight_param_allocation``).
            runtime_gather_output: overrides ``gather_output`` when not None.

        Returns:
            ``(output, bias)`` as :meth:`ColumnParallelLinear.forward`.
        """
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "weight was not supplied to BitNetColumnParallelLinear forward pass and "
                    "skip_weight_param_allocation is True."
                )
            weight = self.weight
        else:
            expected_shape = (self.output_size_per_partition, self.input_size)
            if weight.shape != expected_shape:
                raise RuntimeError(
                    f"supplied weight's shape is {tuple(weight.shape)}, "
                    f"not {expected_shape} as expected"
                )
        bias = self.bias if not self.skip_bias_add else None
        fold = self._folds_multipliers(bias_in_product=bias is not None)

        x = self._scale_input(input_, fold)
        if self.rms_norm is not None:
            x = self.rms_norm(x)  # per token: fine on a sequence shard, before the TP region
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=True, group=self.tp_group
            )
        elif not self.disable_grad_reduce:
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)

        output_parallel = self._bitnet_matmul(x, weight, bias, fold=fold)

        gather_output = self.gather_output
        if runtime_gather_output is not None:
            gather_output = runtime_gather_output
        if gather_output:
            output = gather_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        else:
            output = output_parallel
        output_bias = self.bias if self.skip_bias_add else None
        if fold:
            return output, self.forward_multipliers.scale_output(output_bias, with_input=False)
        return self._scale_outputs(output, output_bias)

    def extra_repr(self) -> str:
        """The parent's printout plus the BitNet role and its beta segments."""
        return (
            f"{super().extra_repr()}, bitnet_role={self.bitnet_role!r}, "
            f"segments={self.bitnet_segment_names}"
        )


# --------------------------------------------------------------------------------------------
# Row parallel
# --------------------------------------------------------------------------------------------


class BitNetRowParallelLinear(BitNetLinearMixin, RowParallelLinear):
    """BitNet b1.58 :class:`RowParallelLinear` (input features split over TP ranks).

    Same constructor and forward contract as the parent.  Each rank holds a slice of every
    token's hidden row, so the per-token absmax is all-reduced (MAX) before quantising and the
    weight scale is all-reduced (SUM of abs sums); partial outputs are then summed (or
    reduce-scattered under sequence parallelism) exactly like the parent.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group: Optional[dist.ProcessGroup] = None,
        name: Optional[str] = None,
        role: str = "",
        multipliers: bool = False,
    ):
        _check_supported(type(self).__name__, config, is_expert)
        super().__init__(
            input_size,
            output_size,
            config=_config_for_parent(config),
            init_method=init_method,
            bias=bias,
            input_is_parallel=input_is_parallel,
            skip_bias_add=skip_bias_add,
            stride=stride,
            keep_master_weight_for_test=keep_master_weight_for_test,
            is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=tp_group,
            name=name,
        )
        self._bitnet_setup(config, self.output_size, role, multipliers)
        self.rms_norm: Optional[BitNetInputRMSNorm] = None
        if getattr(config, "bitnet_rms_norm", False):
            self.rms_norm = BitNetInputRMSNorm(
                self.input_size_per_partition,
                input_size,
                _rms_norm_eps(config),
                partitioned=True,
                tp_group=self.tp_group,
                dtype=config.params_dtype,
                device=_param_device(self),
            )
            # Sharded like the input features (each rank owns its slice, gradient complete).
            set_tensor_model_parallel_attributes(self.rms_norm.weight, True, 0, 1)
        self._prepare_fold_scale()

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """BitNet row-parallel forward.

        Args:
            input_: ``[s, b, h/tp]`` if ``input_is_parallel`` else ``[s, b, h]`` (or any
                ``[..., h]``).

        Returns:
            ``(output, bias)`` as :meth:`RowParallelLinear.forward`.
        """
        fold = self._folds_multipliers(
            bias_in_product=self.bias is not None and not self.skip_bias_add
        )
        input_ = self._scale_input(input_, fold)
        if self.input_is_parallel:
            x = input_
        else:
            assert not self.sequence_parallel
            x = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        if self.rms_norm is not None:
            x = self.rms_norm(x)

        gamma = None
        if get_pg_size(self.tp_group) > 1:
            # Per-token absmax over the full hidden row (no gradient: STE).
            with torch.no_grad():
                gamma = F.activation_absmax(x, self.bitnet_backend).contiguous()
                dist.all_reduce(gamma, op=dist.ReduceOp.MAX, group=self.tp_group)

        output_parallel = self._bitnet_matmul(x, self.weight, None, gamma=gamma, fold=fold)

        if self.sequence_parallel:
            output_ = reduce_scatter_to_sequence_parallel_region(
                output_parallel, group=self.tp_group
            )
        else:
            output_ = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        if not self.skip_bias_add:
            output = (output_ + self.bias) if self.bias is not None else output_
            output_bias = None
        else:
            output = output_
            output_bias = self.bias
        if fold:
            return output, self.forward_multipliers.scale_output(output_bias, with_input=False)
        return self._scale_outputs(output, output_bias)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along axis 1; the input RMSNorm weight (if any) along axis 0."""
        if self.rms_norm is None:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 1, "rms_norm.weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )

    def extra_repr(self) -> str:
        """The parent's printout plus the BitNet role and its beta segments."""
        return (
            f"{super().extra_repr()}, bitnet_role={self.bitnet_role!r}, "
            f"segments={self.bitnet_segment_names}"
        )
