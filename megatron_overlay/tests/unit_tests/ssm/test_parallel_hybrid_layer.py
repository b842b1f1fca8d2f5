# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Unit tests of the parallel hybrid ('P') layer and the Falcon-H1 specs (single rank; on the CPU
where the tree trains on CPU, else on a GPU: see the ``single_rank`` fixture)."""

import pytest
import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
from megatron.core.models.hybrid.parallel_hybrid_layer import (
    ParallelHybridLayer,
    ParallelHybridMixer,
)
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.ssm.falcon_h1_test_utils import (
    MULTIPLIERS,
    tiny_hybrid_config,
    tiny_hybrid_model,
)


def test_layer_structure(single_rank):
    model = tiny_hybrid_model(tiny_hybrid_config(**MULTIPLIERS))
    layer = model.decoder.layers[0]
    assert isinstance(layer, ParallelHybridLayer)
    assert isinstance(layer.self_attention, ParallelHybridMixer)
    names = {n for n, _ in layer.named_parameters()}
    # One input norm (no norm fused into a projection), separate branch projections.
    assert "input_layernorm.weight" in names
    assert "pre_mlp_layernorm.weight" in names
    assert not [n for n in names if "layer_norm_weight" in n]
    for expected in (
        "self_attention.attention.linear_qkv.weight",
        "self_attention.attention.linear_proj.weight",
        "self_attention.mamba.in_proj.weight",
        "self_attention.mamba.out_proj.weight",
        "self_attention.mamba.conv1d_weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ):
        assert expected in names
    assert layer.self_attention.mamba.inference_cache_key != layer.layer_number


def test_every_block_runs_once_and_outputs_sum(single_rank):
    """The mixer output is attention(u) + mamba(u); no block of the layer runs twice."""
    device = single_rank
    model = tiny_hybrid_model(tiny_hybrid_config(**MULTIPLIERS)).to(device).eval()
    layer = model.decoder.layers[0]
    calls = {}
    for name in ("input_layernorm", "pre_mlp_layernorm", "mlp"):
        getattr(layer, name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    for name in ("attention", "mamba"):
        getattr(layer.self_attention, name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    tokens = torch.randint(0, 64, (2, 10), device=device)
    positions = torch.arange(10, device=device).expand(2, -1)
    with torch.no_grad():
        model(tokens, positions, attention_mask=None)
    assert calls == {
        "input_layernorm": 1,
        "pre_mlp_layernorm": 1,
        "mlp": 1,
        "attention": 1,
        "mamba": 1,
    }

    u = torch.randn(10, 2, 32, device=device)
    rope = model.rotary_pos_emb(10)
    with torch.no_grad():
        mixed, bias = layer.self_attention(u, attention_mask=None, rotary_pos_emb=rope)
        attn, _ = layer.self_attention.attention(u, attention_mask=None, rotary_pos_emb=rope)
        mamba, _ = layer.self_attention.mamba(u)
    assert bias is None
    assert torch.equal(mixed, attn + mamba)


def test_spec_without_parallel_layer_fails_clearly(single_rank):
    with pytest.raises(ValueError, match="parallel_hybrid_layer"):
        tiny_hybrid_model(tiny_hybrid_config(), spec=hybrid_stack_spec_local, pattern="P*")


def test_per_layer_cuda_graphs_get_a_graph_manager_per_layer(single_rank, monkeypatch):
    """Under ``--cuda-graph-impl local`` each P layer gets upstream's per-layer graph manager, as
    attention and Mamba layers do (whether they then train like eager: the GPU test
    test_per_layer_cuda_graphs.py, with the saved-tensor fix of patch 0042). The manager itself
    needs CUDA, so a stand-in records what each layer asks for."""
    from megatron.core.transformer import cuda_graphs

    created = []

    class RecordingManager(torch.nn.Module):
        def __init__(self, config, *args, **kwargs):
            super().__init__()
            created.append(config)

    monkeypatch.setattr(cuda_graphs, "CudaGraphManager", RecordingManager)
    config = tiny_hybrid_config()
    config.cuda_graph_impl = "local"  # set after validation: the config checks need a GPU
    model = tiny_hybrid_model(config)
    layers = list(model.decoder.layers)
    assert [type(layer).__name__ for layer in layers] == ["ParallelHybridLayer"] * 2
    assert all(isinstance(layer.cudagraph_manager, RecordingManager) for layer in layers)
    assert created == [config, config]
    created.clear()
    eager = tiny_hybrid_model(tiny_hybrid_config())
    assert not created and not any(
        hasattr(layer, "cudagraph_manager") for layer in eager.decoder.layers
    )


def test_default_multipliers_are_bit_identical_to_plain_spec(single_rank):
    """With every multiplier at 1.0 the Falcon-H1 spec computes exactly what the local spec
    computes for M / * / - layers."""
    device = single_rank
    config = tiny_hybrid_config()
    torch.manual_seed(5)
    plain = (
        tiny_hybrid_model(config, spec=hybrid_stack_spec_local, pattern="M*-M").to(device).eval()
    )
    falcon = tiny_hybrid_model(config, spec=falcon_h1_stack_spec, pattern="M*-M").to(device).eval()
    falcon.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 9), device=device)
    positions = torch.arange(9, device=device).expand(2, -1)
    with torch.no_grad():
        a = plain(tokens, positions, attention_mask=None)
        b = falcon(tokens, positions, attention_mask=None)
    assert torch.equal(a, b)


def test_static_inference_prefill_then_decode_matches_full_forward(single_rank):
    """Prefill + one decode step (separate KV and Mamba caches) give the full-sequence logits."""
    device = single_rank
    model = tiny_hybrid_model(tiny_hybrid_config(**MULTIPLIERS), pattern="PP").to(device).eval()
    tokens = torch.randint(0, 64, (1, 9), device=device)
    positions = torch.arange(9, device=device).unsqueeze(0)
    with torch.no_grad():
        full = model(tokens, positions, attention_mask=None)
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
    with torch.no_grad(), InferenceMode.active():
        prefill = model(
            tokens[:, :8],
            positions[:, :8],
            attention_mask=None,
            inference_context=context,
            runtime_gather_output=True,
        )
        context.sequence_len_offset += 8
        step = model(
            tokens[:, 8:],
            positions[:, 8:],
            attention_mask=None,
            inference_context=context,
            runtime_gather_output=True,
        )
    # The static context materializes only the last token's logits.
    assert torch.allclose(prefill[:, -1], full[:, 7], atol=1e-5)
    assert torch.allclose(step[:, -1], full[:, 8], atol=1e-5)
    # Both branches kept their own cache entry in the shared dict.
    keys = set(context.key_value_memory_dict)
    assert {1, 2} <= keys and {("parallel_hybrid_mamba", 1), ("parallel_hybrid_mamba", 2)} <= keys
