# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Per-layer CUDA graphs keep the buffers autograd saves, also those saved by built-in operators.

``_CudaGraphRunner`` releases a graph's input and output buffers at capture unless they are
tagged ``is_saved_for_backward``; its ``save_for_backward`` observer tags what Python autograd
functions save, and the recording pass's saved-tensor hooks tag what built-in operators save
(torch's RMSNorm saves the layer input). Without the hooks such an input is released at capture
while the backward graph still reads it; on an H100 the local specs' layers then trained wrongly
under per-layer graphs (``tests/unit_tests/ssm/test_per_layer_cuda_graphs.py``, GPU).
"""

import pytest
import torch

from megatron.core.transformer.cuda_graphs import (
    _tag_tensor_saved_by_autograd,
    _unpack_saved_tensor,
)


def _saved_for_backward(tensor) -> bool:
    metadata = getattr(tensor, "cg_buffer_metadata", None)
    return bool(metadata is not None and metadata.is_saved_for_backward)


@pytest.mark.parametrize(
    "norm", [torch.nn.RMSNorm(8), torch.nn.LayerNorm(8)], ids=["RMSNorm", "LayerNorm"]
)
def test_input_saved_by_a_torch_norm_is_tagged(norm):
    hidden = torch.randn(3, 2, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
        _tag_tensor_saved_by_autograd, _unpack_saved_tensor
    ):
        out = norm(hidden)
    assert _saved_for_backward(hidden)
    # The backward unpacks the very tensors it saved: same gradients as without the hooks.
    out.pow(2).sum().backward()
    reference = hidden.detach().clone().requires_grad_()
    norm.zero_grad()
    norm(reference).pow(2).sum().backward()
    assert torch.equal(hidden.grad, reference.grad)


def test_without_the_hooks_a_torch_norm_leaves_its_input_untagged():
    """The control: the save_for_backward observer alone never sees built-in operators."""
    hidden = torch.randn(3, 2, 8, requires_grad=True)
    torch.nn.RMSNorm(8)(hidden)
    assert not _saved_for_backward(hidden)


def test_an_input_nothing_saves_stays_untagged():
    """A residual add saves nothing: its input keeps no extra lifetime."""
    hidden = torch.randn(3, 2, 8, requires_grad=True)
    other = torch.randn(3, 2, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
        _tag_tensor_saved_by_autograd, _unpack_saved_tensor
    ):
        hidden + other
    assert not _saved_for_backward(hidden)
