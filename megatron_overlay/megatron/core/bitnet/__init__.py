# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet b1.58 (ternary weights, int8 activations) training core for Megatron.

Public API (see :mod:`.functional`): :func:`bitnet_linear`, :class:`BitNetWeightCache`,
:func:`invalidate_weight_caches` (optimizer steps and ``load_state_dict`` of BitNet layers
invalidate the caches themselves, see :class:`WeightCacheRegistry`), the separable scale /
quantisation / product ops used by tensor-parallel layers, and the pure-torch reference in
:mod:`.quant`.  The Triton kernels in
:mod:`.triton_kernels` are imported lazily (this package imports without Triton).  The
Megatron tensor-parallel layers live in :mod:`.layers` (``BitNetColumnParallelLinear``,
``BitNetRowParallelLinear``); import that module explicitly (it is not
imported here, so this package stays importable without Megatron's tensor-parallel stack).

The weight scale ``beta`` is a scalar per weight or a vector with one value per output row
(weights fusing several logical matrices: q/k/v, gate/up); see :mod:`.quant`.

Environment knobs (all optional):

* ``BITNET_BACKEND`` = ``auto`` (default: Triton on CUDA tensors, torch otherwise) | ``torch``
  | ``triton``.
* ``BITNET_DGRAD`` = ``cublas`` (default: cuBLAS on a ``beta*T`` temporary dequantised from
  the cached int8 T per backward) | ``cublas_cached`` (the bf16 ``beta*T`` kept in the weight
  cache for the whole step: 2 more bytes per parameter) | ``triton`` (int8 T converted inside
  our GEMM; slower on H100).  ``BITNET_WGRAD`` = ``cublas`` (default) | ``triton`` (x_q
  dequantised inside our GEMM instead of into a bf16 temporary; slower on H100).
* ``BITNET_WEIGHT_CACHE=0``: disable all weight caches.
* ``BITNET_TRITON_AUTOTUNE=0``: use fixed GEMM configs instead of autotuning.
"""

from . import quant
from .functional import (
    WEIGHT_CACHES,
    BitNetLinearFunction,
    BitNetWeightCache,
    QuantizedActivation,
    QuantizedWeight,
    WeightCacheRegistry,
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
    weight_cache_generation,
    weight_row_abs_sums,
    weight_scale,
    weight_scale_from_abs_sum,
)

__all__ = [
    "quant",
    "BitNetLinearFunction",
    "BitNetWeightCache",
    "QuantizedActivation",
    "QuantizedWeight",
    "WEIGHT_CACHES",
    "WeightCacheRegistry",
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
    "weight_cache_generation",
    "weight_row_abs_sums",
    "weight_scale",
    "weight_scale_from_abs_sum",
]
