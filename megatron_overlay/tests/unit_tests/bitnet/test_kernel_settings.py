# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""BitNet kernel settings, from the command line to the kernels a layer runs.

``--bitnet-backend``, ``--bitnet-dgrad``, ``--bitnet-wgrad`` and ``--no-bitnet-weight-cache``
are TransformerConfig fields: parsed into the config, checked there, read by the BitNet layers
and passed to the ops (the environment plays no part).
"""

import dataclasses
import sys

import pytest
import torch

from megatron.core.bitnet import functional as F
from megatron.core.bitnet import layers as L
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.bitnet.bitnet_layer_helpers import init_normal
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)

SETTINGS = ("bitnet_backend", "bitnet_dgrad", "bitnet_wgrad", "bitnet_weight_cache")
DEFAULTS = {
    "bitnet_backend": "auto",
    "bitnet_dgrad": "cublas",
    "bitnet_wgrad": "cublas",
    "bitnet_weight_cache": True,
}
# What the removed environment variables would have asked for: the settings must ignore them.
OLD_ENVIRONMENT = {
    "BITNET_BACKEND": "triton",
    "BITNET_DGRAD": "triton",
    "BITNET_WGRAD": "triton",
    "BITNET_WEIGHT_CACHE": "0",
}
MODEL = [
    "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
    "--use-bitnet", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
    "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
]  # fmt: skip


def _args(monkeypatch, *flags):
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *MODEL, *flags])
    args = parse_args(ignore_unknown_args=True)
    args.params_dtype = torch.float32  # validate_args' job, not run here
    return args


def _config(monkeypatch, *flags):
    """The TransformerConfig that training builds from these command-line flags."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    return core_transformer_config_from_args(_args(monkeypatch, *flags))


def _layer(config):
    return L.BitNetColumnParallelLinear(32, 24, config=config, init_method=init_normal, bias=False)


def _x():
    return torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)


def test_defaults_are_the_previous_behaviour(monkeypatch):
    args = _args(monkeypatch)
    assert {name: getattr(args, name) for name in SETTINGS} == DEFAULTS
    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    assert {name: fields[name] for name in SETTINGS} == DEFAULTS


def test_flags_reach_the_config_and_the_ops(monkeypatch, single_rank):
    for key, value in OLD_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    flags = [
        "--bitnet-backend", "torch", "--bitnet-dgrad", "cublas_cached", "--bitnet-wgrad",
        "triton", "--no-bitnet-weight-cache",
    ]  # fmt: skip
    config = _config(monkeypatch, *flags)
    assert (config.bitnet_backend, config.bitnet_dgrad, config.bitnet_wgrad) == (
        "torch",
        "cublas_cached",
        "triton",
    )
    assert config.bitnet_weight_cache is False
    layer = _layer(config)
    assert layer.bitnet_weight_cache.enabled is False
    calls = []

    def recording_linear(x, weight, bias=None, **kwargs):
        calls.append(kwargs)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    monkeypatch.setattr(F, "bitnet_linear", recording_linear)
    layer(_x())
    assert [(c["backend"], c["dgrad"], c["wgrad"]) for c in calls] == [
        ("torch", "cublas_cached", "triton")
    ]


def _triton_or_skip():
    if not F.triton_available():
        pytest.skip("triton is not importable")
    from megatron.core.bitnet import triton_kernels as tk

    if not tk.interpret_mode():
        pytest.skip("CPU layers need Triton's CPU interpreter (TRITON_INTERPRET=1)")
    return tk


# flags -> kernels that must run (forward, input gradient, weight gradient) and must not
KERNEL_CASES = {
    "defaults": ([], {"scaled_int_matmul"}),
    "torch": (["--bitnet-backend", "torch"], {"scaled_int_matmul"}),
    "triton": (["--bitnet-backend", "triton"], {"bitnet_fwd", "weight_dequant", "act_dequant"}),
    "triton_dgrad_cached": (
        ["--bitnet-backend", "triton", "--bitnet-dgrad", "cublas_cached"],
        {"bitnet_fwd", "act_dequant"},
    ),
    "triton_gemms": (
        ["--bitnet-backend", "triton", "--bitnet-dgrad", "triton", "--bitnet-wgrad", "triton"],
        {"bitnet_fwd", "bitnet_dgrad", "bitnet_wgrad"},
    ),
}
KERNELS = ("bitnet_fwd", "bitnet_dgrad", "bitnet_wgrad", "weight_dequant", "act_dequant")


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_flags_choose_the_kernels(monkeypatch, single_rank, case):
    tk = _triton_or_skip()
    monkeypatch.setenv("BITNET_TRITON_AUTOTUNE", "0")
    for key, value in OLD_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    flags, expected = KERNEL_CASES[case]
    ran = set()

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            ran.add(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in KERNELS:
        spy(tk, name)
    spy(F.quant, "scaled_int_matmul")
    layer = _layer(_config(monkeypatch, *flags))
    y, _ = layer(_x())
    y.sum().backward()
    assert ran == expected
    dense = layer.bitnet_weight_cache._value.dense
    assert (dense is not None) == (case == "triton_dgrad_cached")


@pytest.mark.parametrize("flags,quantisations", [([], 1), (["--no-bitnet-weight-cache"], 3)])
def test_weight_cache_flag(monkeypatch, single_rank, flags, quantisations):
    monkeypatch.setenv("BITNET_WEIGHT_CACHE", "0")  # not read: the flag decides
    layer = _layer(_config(monkeypatch, *flags))
    calls = []
    original = L.BitNetLinearMixin.bitnet_weight_scale

    def counting(self, weight=None):
        calls.append(1)
        return original(self, weight)

    monkeypatch.setattr(L.BitNetLinearMixin, "bitnet_weight_scale", counting)
    for _ in range(3):  # micro-batches of one step
        layer(_x())[0].sum().backward()
    assert len(calls) == quantisations


@pytest.mark.parametrize(
    "flag,value,allowed",
    [
        ("--bitnet-backend", "cuda", "auto, torch, triton"),
        ("--bitnet-dgrad", "cublas-cached", "cublas, cublas_cached, triton"),
        ("--bitnet-wgrad", "cublas_cached", "cublas, triton"),
    ],
)
def test_bad_values_name_the_flag_and_the_choices(monkeypatch, capsys, flag, value, allowed):
    with pytest.raises(SystemExit):
        _args(monkeypatch, flag, value)
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    field = flag[2:].replace("-", "_")
    with pytest.raises(ValueError) as err:
        TransformerConfig(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            use_bitnet=True,
            transformer_impl="local",
            **{field: value},
        )
    assert str(err.value) == f"{flag} must be one of {allowed}; got {value!r}"


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("bitnet_backend", "torch", "--bitnet-backend"),
        ("bitnet_dgrad", "triton", "--bitnet-dgrad"),
        ("bitnet_wgrad", "triton", "--bitnet-wgrad"),
        ("bitnet_weight_cache", False, "--no-bitnet-weight-cache"),
    ],
)
def test_settings_need_use_bitnet(field, value, flag):
    with pytest.raises(ValueError, match=f"^{flag} needs --use-bitnet$"):
        TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, **{field: value})
