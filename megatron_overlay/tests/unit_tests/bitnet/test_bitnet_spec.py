# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""--use-bitnet option checks and spec conversion (megatron/core/bitnet/spec.py)."""

import dataclasses
import functools
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core.tensor_parallel", reason="needs the patched Megatron tree")

from megatron.core.bitnet.layers import (  # noqa: E402
    BitNetColumnParallelLinear,
    BitNetRowParallelLinear,
)
from megatron.core.bitnet.spec import (  # noqa: E402
    BitNetSpecError,
    to_bitnet_spec,
    validate_bitnet_config,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402


def _config(**overrides):
    base = dict(
        use_bitnet=True,
        bitnet_rms_norm=False,
        transformer_impl="local",
        bitnet_backend="auto",
        bitnet_dgrad="cublas",
        bitnet_wgrad="cublas",
        bitnet_weight_cache=True,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def test_supported_config_passes():
    validate_bitnet_config(_config())
    validate_bitnet_config(_config(cuda_graph_impl="none", num_moe_experts=None))
    validate_bitnet_config(_config(use_bitnet=False))


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(transformer_impl="transformer_engine"), "--transformer-impl transformer_engine"),
        (dict(num_moe_experts=8), "--num-experts"),
        (dict(fp8="hybrid"), "--fp8-format"),
        (dict(tp_comm_overlap=True), "--tp-comm-overlap"),
        (dict(multi_latent_attention=True), "--multi-latent-attention"),
        (dict(mtp_num_layers=1), "--mtp-num-layers"),
        (dict(cuda_graph_impl="transformer_engine"), "--cuda-graph-impl transformer_engine"),
        (dict(cuda_graph_impl="local"), "--cuda-graph-impl local"),
        (dict(external_cuda_graph=True), "external CUDA graphs"),
    ],
)
def test_unsupported_options_are_named(overrides, flag):
    with pytest.raises(ValueError, match="--use-bitnet does not support") as err:
        validate_bitnet_config(_config(**overrides))
    assert flag in str(err.value)


def test_whole_iteration_cuda_graph_is_accepted():
    """Megatron's whole-iteration graph captures the weight quantisation (verified on GPU)."""
    validate_bitnet_config(_config(cuda_graph_impl="full_iteration", num_moe_experts=None))


def test_rms_norm_needs_use_bitnet():
    with pytest.raises(ValueError, match="--bitnet-rms-norm needs --use-bitnet"):
        validate_bitnet_config(_config(use_bitnet=False, bitnet_rms_norm=True))


def _linears(spec):
    found = {}

    def walk(value, path):
        if isinstance(value, ModuleSpec):
            found[path] = value.module
            walk(value.submodules, path)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}")
        elif isinstance(value, functools.partial):  # upstream's MLP builders
            walk(value.keywords.get("submodules"), path)
        elif isinstance(value, type):
            found[path] = value

    walk(spec, "layer")
    return {p: c for p, c in found.items() if p.rsplit(".", 1)[-1].startswith("linear_")}


def test_local_gpt_spec_converts_every_projection():
    spec = get_gpt_layer_local_spec()
    converted = to_bitnet_spec(spec)
    before, after = _linears(spec), _linears(converted)
    assert sorted(after) == sorted(before) and len(after) == 4, sorted(after)
    for path, cls in after.items():
        base = (
            BitNetRowParallelLinear
            if path.endswith(("proj", "fc2"))
            else BitNetColumnParallelLinear
        )
        assert issubclass(cls, base), (path, cls)
        assert not issubclass(before[path], base)  # the input spec is not modified


def test_unknown_linear_is_an_error_naming_it():
    class TELayerNormColumnParallelLinear:  # stands in for a Transformer Engine module
        pass

    spec = get_gpt_layer_local_spec()
    attn = spec.submodules.self_attention
    bad_attn = dataclasses.replace(
        attn,
        submodules=dataclasses.replace(attn.submodules, linear_qkv=TELayerNormColumnParallelLinear),
    )
    bad = dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=bad_attn)
    )
    with pytest.raises(BitNetSpecError, match="linear_qkv.*TELayerNormColumnParallelLinear"):
        to_bitnet_spec(bad, "layer")


def test_falcon_h1_spec_keeps_roles_and_multipliers():
    """Falcon-H1 projections become BitNet linears that keep their role and multipliers."""
    from megatron.core.models.hybrid.falcon_h1_layer_specs import get_parallel_hybrid_layer_spec
    from megatron.core.models.hybrid.hybrid_backend_specs import LocalSDPASpecProvider

    layer = to_bitnet_spec(get_parallel_hybrid_layer_spec(LocalSDPASpecProvider()), "P")
    mixer = layer.submodules.self_attention.submodules
    attention, mamba = mixer.attention.submodules, mixer.mamba.submodules
    mlp = layer.submodules.mlp.keywords["submodules"]
    expected = {
        "linear_qkv": (attention.linear_qkv, BitNetColumnParallelLinear),
        "linear_proj": (attention.linear_proj, BitNetRowParallelLinear),
        "mamba_in_proj": (mamba.in_proj, BitNetColumnParallelLinear),
        "mamba_out_proj": (mamba.out_proj, BitNetRowParallelLinear),
        "linear_fc1": (mlp.linear_fc1, BitNetColumnParallelLinear),
        "linear_fc2": (mlp.linear_fc2, BitNetRowParallelLinear),
    }
    for role, (spec, cls) in expected.items():
        assert isinstance(spec, ModuleSpec) and spec.module is cls, (role, spec)
        assert spec.params == {"role": role, "multipliers": True}, (role, spec.params)
    # A plain (upstream) projection converts without multipliers.
    gpt = to_bitnet_spec(get_gpt_layer_local_spec())
    qkv = gpt.submodules.self_attention.submodules.linear_qkv
    assert qkv.params == {"role": "linear_qkv", "multipliers": False}
