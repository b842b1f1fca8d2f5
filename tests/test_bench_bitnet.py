"""The BitNet benchmark's peer (torchao's BitNet b1.58 training linear) is the same layer as ours.

``scripts/bench_bitnet.py`` times torchao's linear next to ours; the comparison only means
something if both compute the same function. On CPU in fp32: the same forward (per-token absmax
int8 activations, per-tensor absmean ternary weights) and the same input and weight gradients
(straight-through, the weight gradient from the quantised activations).
"""

from __future__ import annotations

import pytest
from project_paths import load_script

pytestmark = pytest.mark.megatron


def _bench():
    return load_script("scripts/bench_bitnet.py")


def _both(megatron_tree):
    import torch
    import torch.nn.functional as F
    from megatron.core.bitnet import functional as BF

    torch.manual_seed(0)
    w0 = torch.randn(96, 160) * 0.02
    x0 = torch.randn(48, 160) * 2
    dy = torch.randn(48, 96)
    peer = _bench().torchao_bitnet_weight(w0.clone())
    x_peer = x0.clone().requires_grad_(True)
    y_peer = F.linear(x_peer, peer, None)
    y_peer.backward(dy)
    w = torch.nn.Parameter(w0.clone())
    x = x0.clone().requires_grad_(True)
    y = BF.bitnet_linear(x, w)
    y.backward(dy)
    return (y_peer, x_peer.grad, peer.grad), (y, x.grad, w.grad)


def test_torchao_peer_computes_our_bitnet_linear(megatron_tree):
    """Outputs and both gradients equal to fp32 rounding: the two apply the same scales in a
    different order (torchao multiplies the integer GEMM result by them, ours scales an
    operand), so values may differ in the last bits; rtol 1e-6 is about 8 ulp."""
    import torch

    peer, ours = _both(megatron_tree)
    for name, a, b in zip(("output", "input grad", "weight grad"), peer, ours):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (name, (a - b).abs().max())


def test_the_comparison_sees_a_different_layer(megatron_tree):
    """Negative control: the dense linear is not within the forward tolerance of either."""
    import torch
    import torch.nn.functional as F

    (y_peer, _, _), _ = _both(megatron_tree)
    torch.manual_seed(0)
    w0 = torch.randn(96, 160) * 0.02
    x0 = torch.randn(48, 160) * 2
    dense = F.linear(x0, w0)
    assert not torch.allclose(y_peer, dense, rtol=1e-6, atol=1e-6)
    assert (y_peer - dense).abs().max() > 1e-2
