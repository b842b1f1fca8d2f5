# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet b1.58 linear: backend dispatch, weight cache and the STE autograd function.

Layers of this module, bottom up:

1. Backend selection (:func:`resolve_backend`): ``"triton"`` for CUDA tensors when Triton is
   importable, ``"torch"`` (:mod:`.quant`, exact reference) otherwise.  The ``backend=``
   argument of every op (``auto`` | ``torch`` | ``triton``; BitNet layers pass their config's
   ``bitnet_backend``) forces one.  ``triton`` on CPU tensors is allowed only under
   ``TRITON_INTERPRET=1`` (tests).  The backward GEMMs of the triton backend are chosen with
   the ``dgrad=`` / ``wgrad=`` arguments of :func:`bitnet_linear` (config ``bitnet_dgrad`` /
   ``bitnet_wgrad``).
2. Separable ops, used by :class:`BitNetLinearFunction` and meant to be composed by
   tensor-parallel layers with their own communication: scales (:func:`weight_abs_sum`,
   :func:`weight_row_abs_sums` + :func:`segment_sums` for per-segment scales,
   :func:`weight_scale_from_abs_sum`, :func:`expand_segment_scales`,
   :func:`activation_absmax`), quantisers
   (:func:`quantize_weight`, :func:`quantize_activation`) and the three products
   (:func:`bitnet_matmul`, :func:`bitnet_input_grad`, :func:`bitnet_weight_grad`).
3. :class:`BitNetWeightCache`: the quantised weight is computed once per optimizer step and
   reused by every micro-batch; each cache invalidates itself after every ``torch.optim`` step
   (a step post-hook that lives as long as the cache), BitNet layers invalidate theirs after
   ``load_state_dict``, and :func:`invalidate_weight_caches` (on a model) is the call for any
   other write of the weights.
4. :func:`bitnet_linear`: ``y = x_q W_q^T (+ b)`` with identity straight-through gradients to
   the full-precision ``x`` and ``weight``; saves only int8 activations + per-token scales for
   backward; optional gradient-accumulation fusion into ``weight.main_grad`` following
   Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` convention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple, Union

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import quant

__all__ = [
    "BACKENDS",
    "DGRAD_IMPLS",
    "WGRAD_IMPLS",
    "QuantizedWeight",
    "QuantizedActivation",
    "triton_available",
    "resolve_backend",
    "weight_abs_sum",
    "weight_row_abs_sums",
    "segment_sums",
    "weight_scale_from_abs_sum",
    "expand_segment_scales",
    "weight_scale",
    "quantize_weight",
    "fold_output_scale",
    "activation_absmax",
    "quantize_activation",
    "bitnet_matmul",
    "bitnet_input_grad",
    "bitnet_weight_grad",
    "BitNetWeightCache",
    "invalidate_weight_caches",
    "get_quantized_weight",
    "BitNetLinearFunction",
    "bitnet_linear",
]

#: Values of the ``backend`` argument (and of ``TransformerConfig.bitnet_backend``).
BACKENDS = ("auto", "torch", "triton")
#: Input-gradient GEMMs of the triton backend (``dgrad`` argument, ``bitnet_dgrad``).
DGRAD_IMPLS = ("cublas", "cublas_cached", "triton")
#: Weight-gradient GEMMs of the triton backend (``wgrad`` argument, ``bitnet_wgrad``).
WGRAD_IMPLS = ("cublas", "triton")


def _check_choice(what: str, value: str, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"BitNet {what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------

_TRITON_MODULE = None
_TRITON_IMPORT_ERROR: Optional[BaseException] = None


def _triton_kernels():
    """Import :mod:`.triton_kernels` lazily (None if Triton is unusable here)."""
    global _TRITON_MODULE, _TRITON_IMPORT_ERROR
    if _TRITON_MODULE is None and _TRITON_IMPORT_ERROR is None:
        try:
            from . import triton_kernels as _tk

            _TRITON_MODULE = _tk
        except Exception as exc:  # ImportError, or a broken triton install
            _TRITON_IMPORT_ERROR = exc
    return _TRITON_MODULE


def triton_available() -> bool:
    """True if the Triton kernels module imports."""
    return _triton_kernels() is not None


def _interpret() -> bool:
    tk = _triton_kernels()
    return tk is not None and tk.interpret_mode()


def resolve_backend(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """Pick ``"triton"`` or ``"torch"`` for ops on ``tensor``.

    Args:
        tensor: a tensor the op will read (its device decides ``auto``).
        backend: ``auto`` (or ``None``), ``torch`` or ``triton``.
    """
    choice = _check_choice("backend", "auto" if backend is None else backend, BACKENDS)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"BitNet backend 'triton' requested but Triton kernels failed to import: "
                f"{_TRITON_IMPORT_ERROR!r}"
            )
        if not tensor.is_cuda and not _interpret():
            raise RuntimeError(
                "BitNet backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                f"CPU interpreter); got a tensor on {tensor.device}"
            )
        return "triton"
    return "triton" if tensor.is_cuda and triton_available() else "torch"


# Defaults measured on one H100 (torch 2.11, triton 3.6, Llama-3-8B-shaped linears):
# our Triton mixed-input backward GEMMs ran 1.25-1.4x slower than cuBLAS bf16, while the int8
# forward GEMM ran about 1.65x faster than cuBLAS bf16.  So the backward uses cuBLAS on a bf16
# operand.  For the input gradient that operand is beta*T, dequantised from the cached int8 T
# into a temporary just before the GEMM (an elementwise pass reading 1 and writing 2
# bytes/parameter: 0.12 ms next to the 2.7 ms dgrad GEMM of a 4096->28672 weight at 8192
# tokens) and freed right after, so the cache holds only
# T: 1 byte/parameter.  ``cublas_cached`` instead keeps the bf16 beta*T in the cache for
# the whole step (3 bytes/parameter; saves the pass when a step has many micro-batches).


_ADDMM_OUT_DTYPE_OK: Optional[bool] = None


def _accumulate_mm(main_grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``main_grad += a @ b`` with fp32 accumulation/output where the matmul supports it."""
    global _ADDMM_OUT_DTYPE_OK
    if main_grad.dtype == a.dtype:
        main_grad.addmm_(a, b)
        return
    if main_grad.dtype == torch.float32 and main_grad.is_cuda and _ADDMM_OUT_DTYPE_OK is not False:
        try:
            # cuBLAS bf16 x bf16 -> fp32 with beta=1: the product never rounds to bf16.
            torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)
            _ADDMM_OUT_DTYPE_OK = True
            return
        except (TypeError, RuntimeError):
            _ADDMM_OUT_DTYPE_OK = False
    main_grad.add_(torch.matmul(a, b))


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """Ternary weight ``W_q = beta * t``.

    Attributes:
        t: int8 ``[N, K]`` with values in {-1, 0, 1}.
        beta: fp32 scale on the weight's device: 0-dim (one per weight) or ``[N]`` (one per
            output row, for weights that fuse several logical matrices).
        dense: optional ``beta * t`` in a 16/32-bit dtype (cuBLAS input-gradient path).
        row_scale: optional fp32 output-channel scale (0-dim or ``[N]``) that ``beta`` already
            includes (:func:`fold_output_scale`: forward multipliers folded into the weight
            scale). ``t`` was quantised with ``beta / row_scale``; the straight-through weight
            gradient of the full-precision weight is ``row_scale * (dY^T x_q)`` (per row).
    """

    t: torch.Tensor
    beta: torch.Tensor
    dense: Optional[torch.Tensor] = None
    row_scale: Optional[torch.Tensor] = None


@dataclass
class QuantizedActivation:
    """Per-token int8 activation ``x_q = q * gamma / 127``.

    Attributes:
        q: int8 ``[M, K]`` (tokens flattened).
        gamma: fp32 ``[M]``.
        s: optional fp32 ``[M]`` = ``gamma / 127`` (computed on demand if None).
    """

    q: torch.Tensor
    gamma: torch.Tensor
    s: Optional[torch.Tensor] = None

    def scale(self) -> torch.Tensor:
        """Per-token dequantisation factor ``s = gamma / 127``."""
        if self.s is None:
            self.s = quant.activation_dequant_scale(self.gamma)
        return self.s


# --------------------------------------------------------------------------------------------
# Separable ops
# --------------------------------------------------------------------------------------------


def weight_abs_sum(weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Local ``sum|W|`` (0-dim fp64).  TP layers all-reduce it (SUM) across ranks."""
    if resolve_backend(weight, backend) == "triton":
        return _triton_kernels().weight_abs_sum(weight)
    return quant.weight_abs_sum(weight)


def weight_row_abs_sums(weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Local per-output-row ``sum|W[n, :]|`` (fp64 ``[N]``), for per-segment scales."""
    if resolve_backend(weight, backend) == "triton":
        return _triton_kernels().weight_row_abs_sums(weight)
    return quant.weight_row_abs_sums(weight)


def segment_sums(
    row_values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``[S]`` sums of ``row_values [N]`` per segment id (deterministic; see :mod:`.quant`)."""
    return quant.segment_sums(row_values, segment_ids, num_segments)


def weight_scale_from_abs_sum(abs_sum: torch.Tensor, numel) -> torch.Tensor:
    """``beta = max(fp32(abs_sum / numel), 1e-5)``; numel is the global element count (an int,
    or one count per element of ``abs_sum`` for per-segment sums)."""
    return quant.weight_scale_from_abs_sum(abs_sum, numel)


def expand_segment_scales(beta_segments: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-row beta ``[N]`` from per-segment betas ``[S]`` and row segment ids ``[N]``."""
    return quant.expand_segment_scales(beta_segments, segment_ids)


def weight_scale(weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Single-device ``beta`` of ``weight`` (0-dim fp32)."""
    return weight_scale_from_abs_sum(weight_abs_sum(weight, backend), weight.numel())


def quantize_weight(
    weight: torch.Tensor,
    beta: Optional[torch.Tensor] = None,
    *,
    dense_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> QuantizedWeight:
    """Quantise ``weight`` to ``(T, beta[, beta*T in dense_dtype])`` without host sync.

    ``beta`` may be supplied by the caller (e.g. reduced over tensor-parallel shards): one
    element (per-tensor scale, stored 0-dim) or one per output row (stored ``[N]``).
    Computed per tensor from ``weight`` if None.
    """
    be = resolve_backend(weight, backend)
    with torch.no_grad():
        if beta is None:
            beta = weight_scale(weight, be)
        beta = quant.normalize_weight_scale(beta, weight)
        if be == "triton":
            t, dense = _triton_kernels().weight_quant(weight, beta, dense_dtype)
        else:
            t, beta = quant.quantize_weight(weight, beta)
            dense = None if dense_dtype is None else quant.dequantize_weight(t, beta, dense_dtype)
    return QuantizedWeight(t=t, beta=beta, dense=dense)


def fold_output_scale(
    wq: QuantizedWeight,
    row_scale: torch.Tensor,
    *,
    dense_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> QuantizedWeight:
    """``wq`` with an output-channel scale folded into its weight scale.

    ``y = (x_q W_q^T) * row_scale`` (per output channel) equals ``x_q (row_scale * W_q)^T``, so
    a layer's output multipliers can ride in ``beta`` (the forward GEMM's column scale and the
    input-gradient operand) instead of two passes over the activations per step. ``t`` is kept
    (quantised with the unscaled beta); the result records ``row_scale`` for the weight
    gradient (:func:`bitnet_weight_grad`).

    Args:
        wq: a quantised weight without a folded scale.
        row_scale: fp32, one element or one per output row of ``wq.t``.
        dense_dtype: also materialise the scaled ``beta*T`` in this dtype.
    """
    if wq.row_scale is not None:
        raise ValueError("the quantised weight already has a folded output scale")
    with torch.no_grad():
        scale = quant.normalize_weight_scale(row_scale, wq.t)
        beta = wq.beta * scale
        dense = None
        if dense_dtype is not None:
            if resolve_backend(wq.t, backend) == "triton":
                dense = _triton_kernels().weight_dequant(wq.t, beta, dense_dtype)
            else:
                dense = quant.dequantize_weight(wq.t, beta, dense_dtype)
    return QuantizedWeight(t=wq.t, beta=beta, dense=dense, row_scale=scale)


def activation_absmax(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Per-token ``gamma`` (fp32, shape ``x.shape[:-1]``).  Row-parallel layers all-reduce it
    (MAX) across ranks before :func:`quantize_activation`."""
    if resolve_backend(x, backend) == "triton":
        return _triton_kernels().act_absmax(x).reshape(x.shape[:-1])
    return quant.activation_absmax(x)


def quantize_activation(
    x: torch.Tensor, gamma: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> QuantizedActivation:
    """Per-token int8 quantisation of ``x [..., K]`` into ``Q [M, K]`` / ``gamma [M]``.

    With ``gamma=None`` the scale is computed in the same pass (Triton: one read of x).
    """
    k = x.shape[-1]
    if gamma is not None and gamma.numel() != x.numel() // max(k, 1):
        raise ValueError(
            f"gamma has {gamma.numel()} elements, expected one per token of x {tuple(x.shape)}"
        )
    with torch.no_grad():
        if resolve_backend(x, backend) == "triton":
            q, g, s = _triton_kernels().act_quant(x, gamma)
            return QuantizedActivation(q=q, gamma=g, s=s)
        x2 = x.reshape(-1, k)
        q, g = quant.quantize_activation(x2, None if gamma is None else gamma.reshape(-1))
    return QuantizedActivation(q=q, gamma=g)


def bitnet_matmul(
    act: QuantizedActivation,
    wq: QuantizedWeight,
    out_dtype: torch.dtype,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Forward product ``y [M, N] = (gamma/127) * beta * (Q @ T^T)`` (exact integer product)."""
    if resolve_backend(act.q, backend) == "triton":
        return _triton_kernels().bitnet_fwd(act.q, act.scale(), wq.t, wq.beta, out_dtype)
    return quant.scaled_int_matmul(act.q, act.gamma, wq.t, wq.beta, out_dtype)


def bitnet_input_grad(
    grad_output: torch.Tensor,
    wq: QuantizedWeight,
    backend: Optional[str] = None,
    dgrad: str = "cublas",
) -> torch.Tensor:
    """Identity-STE input gradient ``dX [M, K] = dY [M, N] @ (beta*T)``.

    ``dgrad`` (one of :data:`DGRAD_IMPLS`) picks the GEMM on the triton backend: ``cublas``
    (default): ``dtype(beta*T)`` dequantised from the cached int8 T into a temporary, then
    torch.matmul (cuBLAS); the temporary lives only for this GEMM.  ``cublas_cached``: the same
    operand, materialised once per optimizer step by :func:`bitnet_linear` and cached with T
    (2 more bytes per parameter for the whole step).  ``triton``: int8 T read and converted
    in-kernel, beta applied in the fp32 epilogue (no bf16 operand at all; slower on H100).  A
    ``wq`` holding a dense ``beta*T`` of the gradient's dtype is used as is, whatever ``dgrad``.
    """
    _check_choice("dgrad", dgrad, DGRAD_IMPLS)
    if wq.dense is not None and wq.dense.dtype == grad_output.dtype:
        return torch.matmul(grad_output, wq.dense)
    if resolve_backend(grad_output, backend) == "triton":
        tk = _triton_kernels()
        if dgrad == "triton":
            return tk.bitnet_dgrad(grad_output, wq.t, wq.beta)
        # Transient operand: freed when this function returns (before the next layer's GEMM).
        return torch.matmul(grad_output, tk.weight_dequant(wq.t, wq.beta, grad_output.dtype))
    return quant.bitnet_dgrad(grad_output, wq.t, wq.beta)


def bitnet_weight_grad(
    grad_output: torch.Tensor,
    act: QuantizedActivation,
    main_grad: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    wgrad: str = "cublas",
    row_scale: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Identity-STE weight gradient ``dW [N, K] = dY^T @ x_q`` from the saved int8 activations.

    ``row_scale`` (fp32, 0-dim or ``[N]``; the :attr:`QuantizedWeight.row_scale` of a folded
    output scale) multiplies row ``n`` of ``dW`` (computed in fp32, rounded once): a pass over
    the weight instead of one over ``dY``.

    With ``main_grad`` the product is accumulated into it in place (fp32 fused in the Triton
    kernel; other dtypes via a separate add) and None is returned.  ``wgrad`` (one of
    :data:`WGRAD_IMPLS`) picks the GEMM on the triton backend: ``cublas`` (default): x_q
    dequantised from the saved int8 by a Triton kernel, then cuBLAS (fp32 output accumulated
    straight into ``main_grad`` when supported).  ``triton``: x_q dequantised in the GEMM
    operand load, fp32 main_grad accumulation in the epilogue.
    """
    _check_choice("wgrad", wgrad, WGRAD_IMPLS)
    if row_scale is not None:
        return _scaled_weight_grad(grad_output, act, main_grad, backend, wgrad, row_scale)
    be = resolve_backend(grad_output, backend)
    if be == "triton":
        tk = _triton_kernels()
        s = act.scale()
        fused_ok = (
            main_grad is not None and main_grad.dtype == torch.float32 and main_grad.is_contiguous()
        )
        if wgrad == "triton":
            if main_grad is None:
                return tk.bitnet_wgrad(grad_output, act.q, s)
            if fused_ok:
                return tk.bitnet_wgrad(grad_output, act.q, s, main_grad=main_grad)
            main_grad.add_(tk.bitnet_wgrad(grad_output, act.q, s, out_dtype=torch.float32))
            return None
        xq = tk.act_dequant(act.q, s, grad_output.dtype)
        if main_grad is None:
            return torch.matmul(grad_output.t(), xq)
        _accumulate_mm(main_grad, grad_output.t(), xq)
        return None
    if main_grad is not None and main_grad.dtype != torch.float32:
        main_grad.add_(quant.bitnet_wgrad(grad_output, act.q, act.gamma))
        return None
    return quant.bitnet_wgrad(grad_output, act.q, act.gamma, main_grad=main_grad)


def _scaled_weight_grad(
    grad_output: torch.Tensor,
    act: QuantizedActivation,
    main_grad: Optional[torch.Tensor],
    backend: Optional[str],
    wgrad: str,
    row_scale: torch.Tensor,
) -> Optional[torch.Tensor]:
    """:func:`bitnet_weight_grad` with rows scaled by ``row_scale``: the unscaled product in
    fp32, then one fused multiply(-add) over the weight."""
    n = grad_output.shape[-1]
    if row_scale.numel() not in (1, n):
        raise ValueError(f"row_scale has {row_scale.numel()} elements, expected 1 or {n}")
    scale = row_scale.reshape(-1, 1) if row_scale.numel() == n and n != 1 else row_scale.reshape(())
    if resolve_backend(grad_output, backend) == "triton":
        tk = _triton_kernels()
        s = act.scale()
        if wgrad == "triton":
            product = tk.bitnet_wgrad(grad_output, act.q, s, out_dtype=torch.float32)
        else:
            xq = tk.act_dequant(act.q, s, grad_output.dtype)
            product = _mm_fp32(grad_output.t(), xq)
    else:
        xq = quant.dequantize_activation(act.q, act.gamma, grad_output.dtype)
        product = torch.matmul(grad_output.t().to(torch.float32), xq.to(torch.float32))
    if main_grad is not None:
        main_grad.addcmul_(product, scale)
        return None
    out = torch.empty(product.shape, dtype=grad_output.dtype, device=product.device)
    return torch.mul(product, scale, out=out)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp32 output of the 16-bit GEMM where supported)."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.is_cuda and _ADDMM_OUT_DTYPE_OK is not False:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.matmul(a, b).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Weight cache
# --------------------------------------------------------------------------------------------


def invalidate_weight_caches(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> int:
    """Invalidate every :class:`BitNetWeightCache` held by a module of ``model``.

    Optimizer steps and ``load_state_dict`` of BitNet layers do this on their own (see
    :class:`BitNetWeightCache`); call it after writing the weights of ``model`` any other way
    (through ``param.data``, a parameter buffer, a weight refit, an optimizer step replayed from
    a CUDA graph).  Only the caches of ``model`` are touched, not those of other models.

    Args:
        model: a module or an iterable of modules (Megatron's list of model chunks); every
            cache found as an attribute of one of their submodules is invalidated.

    Returns:
        The number of caches invalidated.
    """
    roots = [model] if isinstance(model, torch.nn.Module) else list(model)
    count = 0
    seen = set()
    for root in roots:
        for module in root.modules():
            for value in vars(module).values():
                if isinstance(value, BitNetWeightCache) and id(value) not in seen:
                    seen.add(id(value))
                    value.invalidate()
                    count += 1
    return count


def _invalidate_after_optimizer_step(cache_ref: "weakref.ref[BitNetWeightCache]"):
    """A ``torch.optim`` step post-hook that invalidates the cache (weakly referenced)."""

    def hook(optimizer, args, kwargs) -> None:
        cache = cache_ref()
        if cache is not None:
            cache.invalidate()

    return hook


def _capturing() -> bool:
    """True while the current CUDA stream records a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class BitNetWeightCache:
    """Holds one weight's quantisation for reuse across the micro-batches of a step.

    Each cache owns what refreshes it, for as long as it lives (a BitNet layer creates one and
    keeps it for its lifetime; nothing about it is held per process):

    * the optimizer step: the cache registers a ``torch.optim`` step post-hook
      (``register_optimizer_step_post_hook``), which runs after the step of every
      ``torch.optim.Optimizer`` and invalidates it; the hook holds the cache weakly and is
      removed when the cache is garbage collected.  Megatron's optimizers
      (``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``, ``FP32Optimizer``,
      chained or not) step an inner ``torch.optim`` / apex / Transformer Engine optimizer, so
      any loop calling ``MegatronOptimizer.step()`` refreshes the caches, not only Megatron's
      ``train_step``.  The step's later writes into the model weights (the copy of the fp32
      main parameters into the bf16 / fp16 model parameters, the distributed optimizer's
      parameter all-gather, also when it is overlapped with the next forward pass) need no
      further signal: a layer quantises lazily, in its own forward, which runs after
      Megatron's forward pre-hook has waited for the all-gather of that layer's parameters;
    * loading weights: BitNet layers invalidate their cache in a ``load_state_dict`` post-hook;
    * anything else that writes weights without going through the parameter (``param.data``
      copies, writes into a parameter buffer, RL weight refits, EMA swaps, an optimizer step
      replayed from a CUDA graph, which runs no Python hook) must call
      :func:`invalidate_weight_caches` on the model (its caches) or :meth:`invalidate` (one).

    A hit needs the key of the stored quantisation to match the weight:

    * not invalidated since (:meth:`invalidate`) -- the authoritative signal.  Megatron writes
      model weights through ``param.data`` / multi-tensor copies from the fp32 main params and
      through all-gathers into the shared parameter buffer; none of these bump
      ``param._version`` (verified for ``.data.copy_`` and writes through another view of the
      buffer), so the key below alone would serve stale weights there;
    * the same weight object (a weak reference: a parameter replaced by another one misses even
      if the allocator hands it the same address);
    * ``weight._version`` (if ``check_version``): catches in-place updates made through the
      parameter itself (``torch.optim`` steps, ``param.add_`` / ``copy_`` under no_grad);
    * ``data_ptr`` (``param.data = ...`` swaps the storage), shape, dtype, device, and the
      requested extras (dense dtype, backend).

    Note for tensor-parallel use with a cross-rank beta: a miss triggers a collective, so all
    ranks must miss together; invalidations (optimizer steps, loads, explicit calls) and
    in-place updates are rank-symmetric, which guarantees that.

    BitNet layers create theirs with ``enabled=config.bitnet_weight_cache``
    (``--no-bitnet-weight-cache`` re-quantises on every call).

    CUDA graphs: a replay runs none of this Python, so what a captured region contains must
    stay right for every replay. A whole-iteration graph (``--cuda-graph-impl full_iteration``)
    starts after the optimizer step invalidated the caches, so its first micro-batch captures
    the quantisation and later micro-batches of the capture reuse it (``reuse_in_capture``):
    every replay re-quantises exactly once. A per-layer graph (``--cuda-graph-impl local``) may
    be captured while the cache holds an eager quantisation of the same step; reusing it would
    freeze those weights into the graph, so such captures always quantise (and store nothing).

    Args:
        enabled: False: never cache (every call re-quantises).
        check_version: include ``weight._version`` in the key.
        reuse_in_capture: during CUDA-graph capture, keep caching (True: whole-iteration
            graphs) or quantise on every call (False).

    Attributes:
        hits, misses: lookups served from the cache / computed.
        invalidations: how many times :meth:`invalidate` ran (optimizer steps, loads, explicit
            calls): the cache's generation.
    """

    def __init__(
        self, enabled: bool = True, check_version: bool = True, reuse_in_capture: bool = False
    ):
        self.enabled = enabled
        self.check_version = check_version
        self.reuse_in_capture = reuse_in_capture
        self._weight: Optional[weakref.ref] = None
        self._key: Optional[Tuple] = None
        self._value: Optional[QuantizedWeight] = None
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._install_optimizer_hook()

    def _install_optimizer_hook(self) -> None:
        handle = register_optimizer_step_post_hook(
            _invalidate_after_optimizer_step(weakref.ref(self))
        )
        self.optimizer_hook_id = handle.id
        finalizer = weakref.finalize(self, handle.remove)
        finalizer.atexit = False

    def invalidate(self) -> None:
        """Drop the cached quantisation of this cache only."""
        self._clear()
        self.invalidations += 1

    def _clear(self) -> None:
        self._weight = None
        self._key = None
        self._value = None

    def __getstate__(self) -> dict:
        # Copies and pickles start empty (a weak reference cannot be copied or pickled) and
        # install their own optimizer hook.
        state = dict(self.__dict__)
        state.update(_weight=None, _key=None, _value=None, optimizer_hook_id=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._install_optimizer_hook()  # a copy (deepcopy of a layer, unpickling) is a new cache

    def _make_key(self, weight: torch.Tensor, extra: Tuple) -> Optional[Tuple]:
        if weight.is_inference():
            return None  # inference tensors have no version counter
        version = weight._version if self.check_version else None
        return (version, weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, extra)

    def get(
        self, weight: torch.Tensor, compute: Callable[[], QuantizedWeight], extra_key: Tuple = ()
    ) -> QuantizedWeight:
        """Return the cached quantisation of ``weight`` or ``compute()`` and store it."""
        if not self.enabled:
            return compute()
        if not self.reuse_in_capture and _capturing():
            self.misses += 1
            self._clear()
            return compute()
        key = self._make_key(weight, extra_key)
        if (
            key is not None
            and key == self._key
            and self._value is not None
            and self._weight is not None
            and self._weight() is weight
        ):
            self.hits += 1
            return self._value
        self.misses += 1
        value = compute()
        # Key taken before compute(): an update racing with compute() then forces a re-quantise.
        if key is None:
            self._clear()
        else:
            self._weight, self._key, self._value = weakref.ref(weight), key, value
        return value


def get_quantized_weight(
    weight: torch.Tensor,
    *,
    cache: Optional[BitNetWeightCache] = None,
    beta: Optional[torch.Tensor] = None,
    beta_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    dense_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    output_scale: Optional[torch.Tensor] = None,
) -> QuantizedWeight:
    """Quantise ``weight`` (through ``cache`` if given).

    Args:
        cache: optional :class:`BitNetWeightCache`.
        beta: precomputed scale; used on a miss (ignored on a hit).  0-dim / 1 element (per
            tensor) or ``[N]`` (per output row).
        beta_fn: ``weight -> beta`` called only on a miss (e.g. local abs-sums + all-reduce +
            :func:`weight_scale_from_abs_sum` in a TP layer); returns a scale of either form
            above; mutually exclusive with beta.
        dense_dtype: also materialise ``beta*T`` in this dtype (cuBLAS dgrad path).
        output_scale: optional fp32 output-channel scale folded into the result
            (:func:`fold_output_scale`); the cache keeps it with the quantisation (keyed by the
            scale tensor's identity: pass the same tensor on every call).
    """
    if beta is not None and beta_fn is not None:
        raise ValueError("pass at most one of beta and beta_fn")
    be = resolve_backend(weight, backend)

    def compute() -> QuantizedWeight:
        with torch.no_grad():
            b = beta_fn(weight) if beta_fn is not None else beta
            if output_scale is None:
                return quantize_weight(weight, b, dense_dtype=dense_dtype, backend=be)
            wq = quantize_weight(weight, b, backend=be)
            return fold_output_scale(wq, output_scale, dense_dtype=dense_dtype, backend=be)

    if cache is None:
        return compute()
    scale_key = None if output_scale is None else id(output_scale)
    return cache.get(weight, compute, extra_key=(dense_dtype, be, scale_key))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class BitNetLinearFunction(torch.autograd.Function):
    """``y = x_q W_q^T + b`` with identity straight-through gradients.

    Forward uses exactly ``W_q = beta*T`` and ``x_q = Q*gamma/127``; backward returns
    ``dX = dY @ W_q`` and ``dW = dY^T @ x_q`` (to the full-precision leaf weight).  Only the
    int8 ``Q`` and fp32 ``gamma`` are saved for backward (not the input).  With a folded output
    scale (``QuantizedWeight.row_scale = s``, ``W_q = s * beta * T``) the weight gradient is
    ``s * (dY^T @ x_q)`` per row: the full-precision weight's STE gradient of
    ``y = (x_q (beta T)^T) * s``.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        wq: QuantizedWeight,
        gamma: Optional[torch.Tensor],
        gradient_accumulation_fusion: bool,
        backend: str,
        dgrad: str,
        wgrad: str,
    ) -> torch.Tensor:
        """``y = x_q W_q^T (+ bias)``; saves the int8 activations for backward."""
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"input features {x.shape[-1]} != weight in_features {weight.shape[1]}"
            )
        act = quantize_activation(x, gamma, backend)
        y = bitnet_matmul(act, wq, out_dtype=x.dtype, backend=backend)
        if bias is not None:
            y = y + bias
        y = y.view(*x.shape[:-1], weight.shape[0])

        if gradient_accumulation_fusion and hasattr(weight, "main_grad"):
            # Not saved with save_for_backward (see Megatron's note on module reuse).
            ctx.main_grad = weight.main_grad
        else:
            ctx.main_grad = None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.backend = backend
        ctx.dgrad = dgrad
        ctx.wgrad = wgrad
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.use_bias = bias is not None
        ctx.save_for_backward(
            act.q, act.gamma, act.s, wq.t, wq.beta, wq.dense, wq.row_scale, weight
        )
        return y

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Straight-through gradients: ``dX = dY W_q``, ``dW = dY^T x_q``, ``db = sum dY``."""
        q, gamma, s, t, beta, dense, row_scale, weight = ctx.saved_tensors
        backend = ctx.backend
        n = t.shape[0]
        dy = grad_output.reshape(-1, n)
        if not dy.is_contiguous():
            dy = dy.contiguous()
        wq = QuantizedWeight(t=t, beta=beta, dense=dense, row_scale=row_scale)

        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = bitnet_input_grad(dy, wq, backend, ctx.dgrad).view(ctx.x_shape)

        grad_weight = None
        if ctx.needs_input_grad[1]:
            act = QuantizedActivation(q=q, gamma=gamma, s=s)
            main_grad = ctx.main_grad
            if main_grad is not None:
                weight.main_grad = main_grad
                bitnet_weight_grad(
                    dy,
                    act,
                    main_grad=main_grad,
                    backend=backend,
                    wgrad=ctx.wgrad,
                    row_scale=row_scale,
                )
                if hasattr(weight, "grad_added_to_main_grad"):
                    # Megatron convention: return a dummy grad so that backward hooks run on
                    # the main thread (overlap_grad_reduce), zeroed if the param asks for it.
                    alloc = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                    grad_weight = alloc(main_grad.shape, dtype=ctx.x_dtype, device=main_grad.device)
                    weight.grad_added_to_main_grad = True
            else:
                grad_weight = bitnet_weight_grad(
                    dy, act, backend=backend, wgrad=ctx.wgrad, row_scale=row_scale
                )
                if grad_weight.dtype != weight.dtype:
                    grad_weight = grad_weight.to(weight.dtype)

        grad_bias = dy.sum(dim=0) if ctx.use_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def bitnet_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    gamma: Optional[torch.Tensor] = None,
    weight_quant: Optional[QuantizedWeight] = None,
    weight_cache: Optional[BitNetWeightCache] = None,
    weight_scale: Optional[torch.Tensor] = None,
    weight_scale_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gradient_accumulation_fusion: bool = False,
    backend: Optional[str] = None,
    dgrad: str = "cublas",
    wgrad: str = "cublas",
    output_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """BitNet b1.58 linear ``y = x_q W_q^T (+ bias)`` with STE gradients.

    Args:
        x: input ``[..., K]`` (2D ``[tokens, K]`` or Megatron's 3D ``[s, b, K]``).
        weight: full-precision weight ``[N, K]`` (the leaf that receives gradients).
        bias: optional bias ``[N]`` (not quantised).
        gamma: optional per-token scale (``x.shape[:-1]`` elements, fp32), e.g. MAX-reduced
            across tensor-parallel ranks; computed from ``x`` if None.
        weight_quant: a precomputed :class:`QuantizedWeight`; bypasses cache and scale args.
        weight_cache: optional :class:`BitNetWeightCache` (quantise once per optimizer step).
        weight_scale: optional precomputed beta (used when quantising): 0-dim / 1 element (one
            scale for the weight) or ``[N]`` (one per output row, e.g. q / k / v rows of a fused
            QKV weight each carrying their own matrix's scale).
        weight_scale_fn: optional ``weight -> beta`` callable, evaluated only when quantising
            (i.e. on a cache miss); returns a scale of either form.  A tensor-parallel layer
            does its cross-rank reduction here.
        gradient_accumulation_fusion: if True and ``weight`` has ``main_grad``, the weight
            gradient is accumulated into ``weight.main_grad`` and the autograd weight gradient
            is None (or a dummy if ``weight.grad_added_to_main_grad`` exists), as in Megatron.
        backend: ``auto`` (default: triton for CUDA tensors when available) / ``torch`` /
            ``triton``.
        dgrad: input-gradient GEMM of the triton backend, one of :data:`DGRAD_IMPLS` (see
            :func:`bitnet_input_grad`); ``cublas_cached`` also caches the dense ``beta*T``
            with the quantised weight while gradients are enabled.
        wgrad: weight-gradient GEMM of the triton backend, one of :data:`WGRAD_IMPLS` (see
            :func:`bitnet_weight_grad`).
        output_scale: optional fp32 scale of the product's output channels (one element or
            ``[N]``): ``y = (x_q W_q^T) * output_scale (+ bias)``, folded into the weight scale
            (:func:`fold_output_scale`, cached with the quantisation) rather than applied to
            ``y`` and to its gradient. Pass the same tensor on every call (cache key).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    be = resolve_backend(x, backend)
    _check_choice("dgrad", dgrad, DGRAD_IMPLS)
    _check_choice("wgrad", wgrad, WGRAD_IMPLS)
    if weight_quant is None:
        dense_dtype = None
        if be == "triton" and dgrad == "cublas_cached" and torch.is_grad_enabled():
            dense_dtype = x.dtype
        weight_quant = get_quantized_weight(
            weight,
            cache=weight_cache,
            beta=weight_scale,
            beta_fn=weight_scale_fn,
            dense_dtype=dense_dtype,
            backend=be,
            output_scale=output_scale,
        )
    elif output_scale is not None:
        weight_quant = fold_output_scale(weight_quant, output_scale, backend=be)
    return BitNetLinearFunction.apply(
        x, weight, bias, weight_quant, gamma, gradient_accumulation_fusion, be, dgrad, wgrad
    )
