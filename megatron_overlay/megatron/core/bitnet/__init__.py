# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet b1.58 (ternary weights, int8 activations) training core for Megatron.

Public API (see :mod:`.functional`): :func:`bitnet_linear`, :class:`BitNetWeightCache`,
:func:`invalidate_weight_caches` (of one model; optimizer steps and ``load_state_dict`` of
BitNet layers invalidate the caches themselves, see :class:`BitNetWeightCache`), the separable
scale / quantisation / product ops used by tensor-parallel layers, and the pure-torch
reference in :mod:`.quant`.  The Triton kernels in :mod:`.triton_kernels` are imported lazily
(this package imports without Triton).  The Megatron tensor-parallel layers live in
:mod:`.layers` (``BitNetColumnParallelLinear``, ``BitNetRowParallelLinear``); import that
module explicitly (it is not imported here, so this package stays importable without
Megatron's tensor-parallel stack).

The weight scale ``beta`` is a scalar per weight or a vector with one value per output row
(weights fusing several logical matrices: q/k/v, gate/up); see :mod:`.quant`.

Settings are TransformerConfig fields (command-line flags), read by the BitNet layers, which
pass them to the ops of :mod:`.functional` as arguments:

* ``bitnet_backend`` (``--bitnet-backend``) = ``auto`` (default: Triton on CUDA tensors, torch
  otherwise) | ``torch`` | ``triton``.
* ``bitnet_dgrad`` (``--bitnet-dgrad``) = ``cublas`` (default: cuBLAS on a ``beta*T``
  temporary dequantised from the cached int8 T per backward) | ``cublas_cached`` (the bf16
  ``beta*T`` kept in the weight cache for the whole step: 2 more bytes per parameter) |
  ``triton`` (int8 T converted inside our GEMM; slower on H100).
* ``bitnet_wgrad`` (``--bitnet-wgrad``) = ``cublas`` (default) | ``triton`` (x_q dequantised
  inside our GEMM instead of into a bf16 temporary; slower on H100).
* ``bitnet_weight_cache`` (``--no-bitnet-weight-cache`` turns it off): quantise each weight
  once per optimizer step (default) or on every call.

One developer override stays in the environment: ``BITNET_TRITON_AUTOTUNE=0`` uses fixed GEMM
configs instead of autotuning (short kernel tests and smoke benchmarks).
"""

from . import quant
from .functional import (
    BACKENDS,
    DGRAD_IMPLS,
    WGRAD_IMPLS,
    BitNetLinearFunction,
    BitNetWeightCache,
    QuantizedActivation,
    QuantizedWeight,
    activation_absmax,
    bitnet_input_grad,
    bitnet_linear,
    bitnet_matmul,
    bitnet_weight_grad,
    expand_segment_scales,
    get_quantized_weight,
    invalidate_weight_caches,
    quantize_activation,
    quantize_weight,
    resolve_backend,
    segment_sums,
    triton_available,
    weight_abs_sum,
    weight_row_abs_sums,
    weight_scale,
    weight_scale_from_abs_sum,
)

__all__ = [
    "quant",
    "BACKENDS",
    "DGRAD_IMPLS",
    "WGRAD_IMPLS",
    "BitNetLinearFunction",
    "BitNetWeightCache",
    "QuantizedActivation",
    "QuantizedWeight",
    "activation_absmax",
    "bitnet_input_grad",
    "bitnet_linear",
    "bitnet_matmul",
    "bitnet_weight_grad",
    "expand_segment_scales",
    "get_quantized_weight",
    "invalidate_weight_caches",
    "quantize_activation",
    "quantize_weight",
    "resolve_backend",
    "segment_sums",
    "triton_available",
    "weight_abs_sum",
    "weight_row_abs_sums",
    "weight_scale",
    "weight_scale_from_abs_sum",
]
