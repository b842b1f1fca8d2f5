# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNetWeightCache: reuse across micro-batches, never stale after a weight change."""

import pytest
import torch

from megatron.core.bitnet import functional as F

BE = "torch"


def _fresh(w):
    return F.quantize_weight(w, backend=BE)


def _same_quant(a, b):
    return torch.equal(a.t, b.t) and torch.equal(a.beta, b.beta)


def _param(seed=0, shape=(32, 48)):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=g) * 0.05)


def test_hits_across_micro_batches():
    w = _param()
    cache = F.BitNetWeightCache()
    first = F.get_quantized_weight(w, cache=cache, backend=BE)
    for _ in range(4):
        again = F.get_quantized_weight(w, cache=cache, backend=BE)
        assert again is first  # same tensors, no re-quantisation, no copies
    assert cache.misses == 1 and cache.hits == 4


def test_inplace_optimizer_step_invalidates_via_version():
    w = _param(1)
    cache = F.BitNetWeightCache()
    opt = torch.optim.SGD([w], lr=10.0)
    x = torch.randn(8, 48)
    for step in range(3):
        for _micro in range(2):
            y = F.bitnet_linear(x, w, weight_cache=cache, backend=BE)
            y_nocache = F.bitnet_linear(x, w, backend=BE)
            assert torch.equal(y, y_nocache), f"stale quantisation at step {step}"
            y.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert cache.misses == 3 and cache.hits == 3


def test_data_copy_needs_explicit_invalidate():
    """Megatron writes params through .data / the param buffer: no version bump, so the
    optimizer-step hook (an invalidation) is what keeps the cache correct."""
    w = _param(2)
    cache = F.BitNetWeightCache()
    old = F.get_quantized_weight(w, cache=cache, backend=BE)
    v0 = w._version
    w.data.copy_(torch.randn(w.shape) * 0.05)
    assert w._version == v0  # the reason a version key alone is not enough
    cache.invalidate()
    new = F.get_quantized_weight(w, cache=cache, backend=BE)
    assert new is not old and _same_quant(new, _fresh(w))
    assert not torch.equal(new.t, old.t)


def test_buffer_view_write_with_invalidate():
    buf = torch.zeros(2 * 32 * 48)
    w = torch.nn.Parameter(torch.empty(32, 48))
    w.data = buf[: 32 * 48].view(32, 48)  # as Megatron's contiguous param buffer
    buf[: 32 * 48].copy_(torch.randn(32 * 48))
    cache = F.BitNetWeightCache()
    F.get_quantized_weight(w, cache=cache, backend=BE)
    buf[: 32 * 48].copy_(torch.randn(32 * 48) * 3)  # e.g. NCCL all-gather into the buffer
    cache.invalidate()
    assert _same_quant(F.get_quantized_weight(w, cache=cache, backend=BE), _fresh(w))


def test_per_cache_invalidate_and_storage_change():
    w = _param(3)
    cache = F.BitNetWeightCache()
    F.get_quantized_weight(w, cache=cache, backend=BE)
    cache.invalidate()
    F.get_quantized_weight(w, cache=cache, backend=BE)
    assert cache.misses == 2
    w.data = torch.randn(32, 48) * 0.05  # new storage
    assert _same_quant(F.get_quantized_weight(w, cache=cache, backend=BE), _fresh(w))
    assert cache.misses == 3


def test_key_includes_requested_extras():
    w = _param(4)
    cache = F.BitNetWeightCache()
    a = F.get_quantized_weight(w, cache=cache, backend=BE)
    b = F.get_quantized_weight(w, cache=cache, dense_dtype=torch.bfloat16, backend=BE)
    assert a.dense is None and b.dense is not None and b.dense.dtype == torch.bfloat16
    assert torch.equal(b.dense, (b.t.float() * b.beta).to(torch.bfloat16))


def test_cache_can_be_disabled():
    w = _param(5)
    cache = F.BitNetWeightCache(enabled=False)
    a = F.get_quantized_weight(w, cache=cache, backend=BE)
    b = F.get_quantized_weight(w, cache=cache, backend=BE)
    assert a is not b and _same_quant(a, b)


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        w = torch.randn(8, 16)
    cache = F.BitNetWeightCache()
    a = F.get_quantized_weight(w, cache=cache, backend=BE)
    b = F.get_quantized_weight(w, cache=cache, backend=BE)
    assert a is not b and _same_quant(a, b)


def test_backward_uses_quantisation_of_its_forward():
    """A micro-batch whose backward runs after a cache refresh keeps its own saved W_q."""
    w = _param(6)
    cache = F.BitNetWeightCache()
    x = torch.randn(4, 48, requires_grad=True)
    y_old = F.bitnet_linear(x, w, weight_cache=cache, backend=BE)
    wq_old = F.quantize_weight(w.detach().clone(), backend=BE)
    w.data.mul_(-1.0)
    cache.invalidate()
    F.bitnet_linear(x.detach(), w, weight_cache=cache, backend=BE)  # refresh
    dy = torch.randn(4, 32)
    y_old.backward(dy)
    expected = dy @ (wq_old.t.float() * wq_old.beta)
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reuse", [False, True], ids=["per-layer-graph", "full-iteration-graph"])
def test_cuda_graph_capture(monkeypatch, reuse):
    """While a CUDA graph is captured, a per-layer graph cache quantises on every call and keeps
    nothing (an eager quantisation of the same step must not be frozen into the graph); a
    whole-iteration graph cache reuses within the capture (one quantisation per replay)."""
    w = _param()
    cache = F.BitNetWeightCache(reuse_in_capture=reuse)
    eager = F.get_quantized_weight(w, cache=cache, backend=BE)  # warm-up step, same weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    first = F.get_quantized_weight(w, cache=cache, backend=BE)
    second = F.get_quantized_weight(w, cache=cache, backend=BE)
    if reuse:
        assert first is eager and second is eager and cache.misses == 1
    else:
        assert first is not eager and second is not first and cache.misses == 3
        assert _same_quant(first, eager)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert F.get_quantized_weight(w, cache=cache, backend=BE) is not second  # kept nothing
