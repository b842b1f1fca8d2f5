# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet's quantised weights are refreshed wherever the weights change, not only in
Megatron's ``train_step``.

* A loop of its own around ``get_megatron_optimizer`` (plain mixed-precision optimizer and
  distributed optimizer, bf16 and fp32, one gloo rank) calls ``optimizer.step()`` and nothing
  else: the forward after every step uses exactly a from-scratch quantisation of the new
  weights.  (Before the optimizer-step hook, bf16 runs kept the first quantisation forever:
  Megatron copies the fp32 main parameters into the bf16 weights without bumping their
  version counter.)
* Two data-parallel ranks with the distributed optimizer and the parameter all-gather
  overlapped with the next forward pass: the all-gather lands during that forward (the
  weights change inside it), and the quantisation, taken lazily in each layer's forward, is
  still the fresh one.
* ``load_state_dict`` drops a layer's cached quantisation; copies of a cache (deepcopy,
  pickle) get their own optimizer hook; a replaced parameter misses even at the same address.
* No BitNet state lives in the process: each cache owns its optimizer hook for exactly its
  lifetime, and an explicit invalidation (:func:`invalidate_weight_caches`, what ``train_step``
  calls after a CUDA-graph optimizer step) reaches the caches of the model it is given only.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core.tensor_parallel", reason="needs the patched Megatron tree")

from megatron.core.bitnet import functional as F  # noqa: E402
from tests.unit_tests.bitnet import bitnet_optimizer_loop as loop  # noqa: E402
from tests.unit_tests.bitnet.bitnet_layer_helpers import (  # noqa: E402
    HIDDEN,
    QKV_OUT,
    init_normal,
    make_config,
)
from tests.unit_tests.gloo_ranks import forkserver_env  # noqa: E402
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: E402,F401 (fixture)

CASES = {
    "bf16_mixed_precision": (torch.bfloat16, False, False),
    "bf16_distributed": (torch.bfloat16, True, False),
    "bf16_distributed_overlap": (torch.bfloat16, True, True),
    "fp32_plain": (torch.float32, False, False),
    "fp32_distributed": (torch.float32, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_own_loop_uses_fresh_quantisation_after_every_step(single_rank, case):
    dtype, distributed, overlap = CASES[case]
    ddp, optimizer = loop.build(dtype, distributed_optimizer=distributed, overlap=overlap)
    records = loop.run(ddp, optimizer, steps=3)
    stale = [(s, i) for s, r in enumerate(records) for i, ok in enumerate(r["fresh"]) if not ok]
    assert not stale, f"(step, layer) with a stale quantisation: {stale}"
    # Not void: the steps changed the ternary weights the forward passes used.
    first, last = records[0]["t"], records[-1]["t"]
    assert len(first) == 4 and any(not torch.equal(a, b) for a, b in zip(first, last))
    # The forward after the last step equals one with every cache disabled.
    for layer in loop.bitnet_layers(ddp):
        layer.bitnet_weight_cache.enabled = False
    tokens, positions, mask = loop._batch(0)
    with torch.no_grad():
        uncached = ddp(tokens, positions, mask, labels=tokens).float().mean()
    assert torch.equal(uncached, records[-1]["loss"])


def test_data_parallel_overlapped_all_gather(tmp_path):
    """DP=2, bf16, distributed optimizer, overlap_param_gather: the weights are completed by
    the all-gather inside the next forward pass, after the step's invalidation."""
    import torch.multiprocessing as mp

    import megatron.core

    roots = [str(Path(megatron.core.__file__).parents[2])]  # holds megatron/ and tests/
    roots += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    preload = [
        "torch.distributed",
        "megatron.core.optimizer",
        "tests.unit_tests.bitnet.bitnet_optimizer_loop",
    ]
    with forkserver_env(preload, roots):
        mp.start_processes(
            loop.worker,
            args=(2, str(tmp_path / "dist_init"), str(tmp_path)),
            nprocs=2,
            join=True,
            start_method="forkserver",
        )
    for rank in range(2):
        records = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for step, r in enumerate(records):
            assert all(r["fresh"]), (rank, step, r["fresh"])
            # the other rank's shard arrived during the forward (else the case proves nothing)
            assert any(r["gathered"]), (rank, step)
        assert any(not torch.equal(a, b) for a, b in zip(records[0]["t"], records[-1]["t"]))


def _layer():
    from megatron.core.bitnet.layers import BitNetColumnParallelLinear

    return BitNetColumnParallelLinear(
        HIDDEN, QKV_OUT, config=make_config(), init_method=init_normal, bias=False
    )


def _x():
    return torch.randn(3, 2, HIDDEN, generator=torch.Generator().manual_seed(5))


def test_load_state_dict_drops_the_cached_quantisation(single_rank):
    layer = _layer()
    layer(_x())
    assert layer.bitnet_weight_cache._value is not None
    state = {k: -v for k, v in layer.state_dict().items() if v is not None}
    layer.load_state_dict(state, strict=False)
    assert layer.bitnet_weight_cache._value is None
    y, _ = layer(_x())
    fresh = F.quantize_weight(layer.weight.detach(), beta=layer.bitnet_weight_scale())
    cached = layer.bitnet_quantized_weight()
    assert torch.equal(cached.t, fresh.t) and torch.equal(cached.beta, fresh.beta)


def _torch_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    torch.optim.SGD([p], lr=0.1).step()  # any torch optimizer's step invalidates every cache


def test_copies_of_a_cache_have_their_own_hook_and_start_empty():
    """deepcopy / pickle (of a module holding a cache) give a new cache with its own optimizer
    hook."""
    w = torch.nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(3)))
    cache = F.BitNetWeightCache()
    F.get_quantized_weight(w, cache=cache, backend="torch")
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert twin is not cache and twin._value is None
        assert twin.optimizer_hook_id != cache.optimizer_hook_id
        old = F.get_quantized_weight(w, cache=twin, backend="torch")
        w.data.copy_(-w.data)  # no version bump
        _torch_optimizer_step()
        new = F.get_quantized_weight(w, cache=twin, backend="torch")
        assert new is not old and torch.equal(new.t, F.quantize_weight(w, backend="torch").t)


def test_each_cache_owns_its_optimizer_hook():
    from torch.optim.optimizer import _global_optimizer_post_hooks

    caches = [F.BitNetWeightCache() for _ in range(2)]
    hook_ids = [cache.optimizer_hook_id for cache in caches]
    assert hook_ids[0] != hook_ids[1]
    assert all(hook_id in _global_optimizer_post_hooks for hook_id in hook_ids)

    w = torch.nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(1)))
    old = F.get_quantized_weight(w, cache=caches[0], backend="torch")
    w.data.copy_(-w.data)  # no version bump: only the step hook can tell
    assert [cache.invalidations for cache in caches] == [0, 0]
    _torch_optimizer_step()
    assert [cache.invalidations for cache in caches] == [1, 1]
    new = F.get_quantized_weight(w, cache=caches[0], backend="torch")
    assert new is not old and torch.equal(new.t, -old.t)

    del caches[0], old, new
    gc.collect()
    assert hook_ids[0] not in _global_optimizer_post_hooks
    assert hook_ids[1] in _global_optimizer_post_hooks
    del caches
    gc.collect()
    assert hook_ids[1] not in _global_optimizer_post_hooks


def test_explicit_invalidation_reaches_only_the_given_model(single_rank):
    """``invalidate_weight_caches(model)`` drops the caches of that model (a module or a list of
    model chunks, nested modules included) and leaves another model's caches alone."""
    a, b, other = _layer(), _layer(), _layer()
    model = torch.nn.Sequential(a, torch.nn.ModuleList([b]))
    for layer in (a, b, other):
        layer(_x())
    assert F.invalidate_weight_caches(model) == 2
    assert a.bitnet_weight_cache._value is None and b.bitnet_weight_cache._value is None
    assert other.bitnet_weight_cache._value is not None
    assert other.bitnet_weight_cache.invalidations == 0
    assert F.invalidate_weight_caches([model, other]) == 3  # Megatron's list of model chunks
    assert other.bitnet_weight_cache._value is None


def test_train_step_helper_invalidates_the_model_it_is_given(single_rank):
    """What ``train_step`` calls after an optimizer step replayed from a CUDA graph."""
    from megatron.training.training import invalidate_bitnet_weight_caches

    trained, other = _layer(), _layer()
    for layer in (trained, other):
        layer(_x())
    invalidate_bitnet_weight_caches([trained])
    assert trained.bitnet_weight_cache._value is None
    assert other.bitnet_weight_cache._value is not None


def test_replaced_parameter_misses_even_at_the_same_address():
    """A new parameter object over the same storage, with the same version count as the cached
    one (e.g. a weight swapped in by assignment where the allocator reused the address)."""
    cache = F.BitNetWeightCache()
    a = torch.nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(2)))
    old = F.get_quantized_weight(a, cache=cache, backend="torch")
    a.data.copy_(-a.data)  # new values, no version bump
    b = torch.nn.Parameter(a.data)
    assert (b.data_ptr(), b._version) == (a.data_ptr(), a._version)
    got = F.get_quantized_weight(b, cache=cache, backend="torch")
    assert got is not old and torch.equal(got.t, F.quantize_weight(b, backend="torch").t)
