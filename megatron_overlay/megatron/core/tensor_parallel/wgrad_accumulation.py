# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Gradient-accumulation fusion without apex: the weight-gradient GEMM accumulated into
``main_grad``, in PyTorch.

``gradient_accumulation_fusion`` (upstream's default; ``--no-gradient-accumulation-fusion`` turns
it off) has Megatron's linears add the weight gradient straight into the parameter's
``main_grad`` instead of returning it: apex's ``fused_weight_gradient_mlp_cuda`` extension runs
``main_grad += grad_output^T @ input`` as one GEMM. Without apex, Megatron's own linears refused
the setting. This module offers the same two functions (same arguments), which
``tensor_parallel/layers.py`` uses when the extension is missing:

* ``float32`` ``main_grad`` of 16-bit activations: on CUDA one ``torch.addmm`` with
  ``out_dtype=float32`` writing into ``main_grad`` (cuBLAS accumulates the products in float32
  and adds them to ``main_grad`` with beta = 1, as apex does): no 16-bit weight gradient, no
  separate add. Elsewhere (CPU runs, PyTorch builds without ``addmm(out_dtype=)``) the inputs
  are promoted to float32 first: the same sum, in another order.
* ``main_grad`` in the activations' dtype: ``main_grad.addmm_``.

The gradients differ from the unfused path only by rounding: the unfused path rounds the weight
gradient to the activations' dtype before adding it to the float32 ``main_grad``.
"""

from __future__ import annotations

import torch


def _has_addmm_out_dtype() -> bool:
    """Whether this PyTorch has ``addmm(..., out_dtype=)`` (CUDA; probed on the meta device)."""
    try:
        torch.addmm(
            torch.empty(1, 1, device="meta"),
            torch.empty(1, 1, device="meta", dtype=torch.bfloat16),
            torch.empty(1, 1, device="meta", dtype=torch.bfloat16),
            out_dtype=torch.float32,
        )
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


_ADDMM_OUT_DTYPE = _has_addmm_out_dtype()


def wgrad_gemm_accum_fp32(
    total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    """``main_grad += grad_output^T @ total_input`` into a float32 ``main_grad`` [out, in]
    (``total_input`` [tokens, in], ``grad_output`` [tokens, out], 2-D, any float dtype)."""
    if total_input.dtype == torch.float32 and grad_output.dtype == torch.float32:
        main_grad.addmm_(grad_output.t(), total_input)
    elif main_grad.is_cuda and _ADDMM_OUT_DTYPE and total_input.dtype == grad_output.dtype:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().float(), total_input.float())


def wgrad_gemm_accum_fp16(
    total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    """``main_grad += grad_output^T @ total_input`` into a 16-bit ``main_grad`` of the
    activations' dtype."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))
