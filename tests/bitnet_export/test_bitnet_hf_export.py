"""BitNet checkpoint export Megatron -> HF transformers (tools/checkpoint/bitnet_hf_export.py).

Checkpoints are real: tiny BitNet models trained for two iterations on CPU with torchrun and
``pretrain_gpt.py`` / ``pretrain_mamba.py`` (the ``bitnet/*`` functional cases' model flags,
``--save`` in the legacy ``torch`` format): GPT at TP=1, GPT at TP=2 with
``--bitnet-rms-norm``, and a Falcon-H1 (pattern ``PP``, TP=1) with ``--bitnet-rms-norm``.

The reference is Megatron itself (``megatron_reference.run_reference``): each checkpoint is
loaded into Megatron at its own TP size with the training builders, which gives its logits and,
from every BitNet layer, the ternary ``T`` and the scales ``beta`` that layer computes (with
its cross-rank reductions). The exported HF checkpoint must

* load with ``from_pretrained`` (fp32, CPU) without missing / unexpected keys, as
  ``LlamaForCausalLM`` / ``FalconH1ForCausalLM`` with BitLinear (or AutoBitLinear) projections
  and a full-precision ``lm_head``;
* give Megatron's logits to fp32 round-off (measured below 1e-6 of the largest logit; the
  tolerance is 1e-5 of it: transformers rounds ``x * (127 / absmax)`` where Megatron rounds
  ``x * 127 / absmax``, so a tie can in principle land on the other integer);
* hold packed weights that unpack to exactly Megatron's per-rank ``T`` (mapped back with the
  HF -> Megatron layouts of ``falcon_h1_layouts``, i.e. independently of the exporter's merge)
  and ``weight_scale == 1/beta`` (BitLinear) or ``beta`` (AutoBitLinear) with Megatron's beta
  of each q / k / v / gate / up / other matrix, bit for bit;
* carry the ``--bitnet-rms-norm`` weights.

``--format dense`` loads as a plain ``LlamaForCausalLM`` whose projections equal ``beta * T``.
A ``torch_dist`` checkpoint saved by Megatron from the TP=2 world exports to the same bytes as
the legacy one. Refusals: existing output, non-BitNet checkpoint, models Llama cannot express,
``--model`` mismatch, dense with ``--bitnet-rms-norm``, incomplete checkpoints.

transformers' BitNet layers wrap their helpers in ``torch.compile``; the tests run them eagerly
(TorchDynamo disabled), which on CPU avoids minutes of Inductor compilation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, checkpoint_tool, megatron_path

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

SEQ = 24
VOCAB = 1024  # the functional cases' --vocab-size (= the padded vocabulary)
# Relative logit tolerance (of the largest |logit|), see the module docstring.
# HF and Megatron reach the int8 activation quantisation with fp32 round-off differences; where
# a value sits on a rounding boundary the two pick neighbouring int8 levels, and that flip moves
# the logits of the tokens after it by far more than round-off. So: the bulk of the logits must
# agree to round-off (median), and no logit may move by more than a few flips would (max).
LOGIT_MEDIAN_RTOL = 1e-6
LOGIT_FLIP_RTOL = 1e-3

CASES = {
    "gpt_tp1": ("gpt_bitnet_tp1", 1, {}),
    "gpt_tp2_rms": ("gpt_bitnet_tp2", 2, {"--bitnet-rms-norm": True}),
    "falcon_rms": (
        "falcon_h1_bitnet",
        1,
        {"--hybrid-layer-pattern": "PP", "--bitnet-rms-norm": True},
    ),
}


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool():
    """The exporter module, imported from the patched tree's tools/checkpoint."""
    tools = megatron_path() / "tools" / "checkpoint"
    if not (tools / "bitnet_hf_export.py").is_file():
        pytest.fail(f"{tools}/bitnet_hf_export.py missing: run `make apply-patches`")
    return checkpoint_tool("bitnet_hf_export")


@pytest.fixture(scope="module")
def layouts():
    return checkpoint_tool("falcon_h1_layouts")


@pytest.fixture(scope="module")
def config_mapping():
    return checkpoint_tool("falcon_h1_config")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bitnet_export")


@pytest.fixture(scope="module")
def checkpoints(tool, work):
    """Trains each case on first use: name -> checkpoint directory."""
    from bitnet_export.megatron_reference import train

    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            case, tp, overrides = CASES[name]
            cache[name] = train(megatron_path(), case, work / name, dict(overrides))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def references(checkpoints, tokens, work):
    """Megatron's reference of each case on first use: name -> per-rank results. The TP=2
    world also saves a torch_dist checkpoint (``work / "gpt_tp2_rms_dist"``)."""
    from bitnet_export.megatron_reference import run_reference

    cache = {}

    def get(name: str):
        if name not in cache:
            _, tp, _ = CASES[name]
            dist_dir = work / f"{name}_dist" if name == "gpt_tp2_rms" else None
            cache[name] = run_reference(checkpoints(name), tp, tokens, work, name, dist_dir)
        return cache[name]

    return get


@pytest.fixture
def eager_transformers():
    """transformers' BitNet helpers run eagerly (no Inductor compilation on CPU)."""
    import torch._dynamo

    if not _has_accelerate():
        pytest.fail(
            "transformers loads BitNet checkpoints only with accelerate installed "
            "(`pip install accelerate`, see requirements/cpu.txt)"
        )
    with torch._dynamo.config.patch(disable=True):
        yield


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _export(tool, load_dir, save_dir, *extra) -> int:
    return tool.main(
        ["--load-dir", str(load_dir), "--save-dir", str(save_dir), "--quiet", *map(str, extra)]
    )


def _args(ckpt: Path):
    """The Megatron args saved in a legacy checkpoint (TP rank 0)."""
    (path,) = ckpt.glob("iter_*/mp_rank_00/model_optim_rng.pt")
    return torch.load(path, weights_only=False)["args"]


def _read(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {directory}"
    return out


def _load_hf(directory: Path):
    """``from_pretrained`` in fp32 on CPU; asserts a clean load report."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"
    return model.eval()


def _assert_logits_match(hf_model, reference, tokens, label: str) -> float:
    with torch.no_grad():
        hf_logits = hf_model(input_ids=tokens).logits
    mg_logits = reference[0]["logits"][..., :VOCAB]
    assert hf_logits.shape == mg_logits.shape
    scale = mg_logits.abs().max().item()
    assert scale > 0
    return _assert_logits_close(hf_logits, mg_logits, scale, label)


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor, scale: float, label: str) -> float:
    """HF's logits equal Megatron's up to round-off, but for int8 rounding flips (see above)."""
    diff = (got - want).abs()
    worst, median = diff.max().item(), diff.median().item()
    print(f"{label}: |HF - Megatron| max {worst:.3g}, median {median:.3g} (max |logit| {scale:.3g})")
    assert median <= LOGIT_MEDIAN_RTOL * scale, f"{label}: median difference {median} ({scale})"
    assert worst <= LOGIT_FLIP_RTOL * scale, f"{label}: logits differ by {worst} (scale {scale})"
    return worst / scale


def _gpt_hf_to_megatron_ranks(layouts, hf: dict, prefix: str, dims, tp: int) -> dict:
    """HF q/k/v/o/gate/up/down tensors of one layer -> Megatron per-rank tensors (the inverse
    layouts, written from the HF side: fused QKV per query group split into whole groups,
    [gate_r; up_r] per rank, row-parallel split on dim 1)."""
    qkv = layouts.qkv_from_hf(
        hf[prefix + "self_attn.q_proj"], hf[prefix + "self_attn.k_proj"],
        hf[prefix + "self_attn.v_proj"], dims,
    )  # fmt: skip
    fc1 = torch.cat([hf[prefix + "mlp.gate_proj"], hf[prefix + "mlp.up_proj"]], dim=0)
    return {
        "self_attention.linear_qkv": layouts.split_dim(qkv, tp, 0),
        "self_attention.linear_proj": layouts.split_dim(hf[prefix + "self_attn.o_proj"], tp, 1),
        "mlp.linear_fc1": layouts.split_segments(fc1, [dims.ffn, dims.ffn], tp),
        "mlp.linear_fc2": layouts.split_dim(hf[prefix + "mlp.down_proj"], tp, 1),
    }


GPT_SEGMENTS = {
    "self_attention.linear_qkv": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
    },
    "self_attention.linear_proj": {"weight": "self_attn.o_proj"},
    "mlp.linear_fc1": {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
    "mlp.linear_fc2": {"weight": "mlp.down_proj"},
}
FALCON_SEGMENTS = {
    "self_attention.attention.linear_qkv": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
    },
    "self_attention.attention.linear_proj": {"weight": "self_attn.o_proj"},
    "self_attention.mamba.in_proj": {"weight": "mamba.in_proj"},
    "self_attention.mamba.out_proj": {"weight": "mamba.out_proj"},
    "mlp.linear_fc1": {"gate": "feed_forward.gate_proj", "up": "feed_forward.up_proj"},
    "mlp.linear_fc2": {"weight": "feed_forward.down_proj"},
}
ROW_PARALLEL = ("linear_proj", "linear_fc2", "out_proj")


def _unpacked(tool, tensors: dict) -> dict:
    """HF module name -> unpacked ternary T (int8) for every packed weight."""
    return {
        name[: -len(".weight")]: tool.unpack_ternary(t)
        for name, t in tensors.items()
        if name.endswith(".weight") and t.dtype == torch.uint8
    }


def _check_scales_and_norms(tensors, reference, segments, layer_count, linear_class) -> int:
    """weight_scale of every HF linear == Megatron's beta of that logical matrix (1/beta for
    BitLinear); the same beta on every TP rank; the BitNet input-norm weights. Returns the
    number of scales checked."""
    checked = 0
    for i in range(layer_count):
        for mg_linear, segs in segments.items():
            entries = [r["layers"][f"decoder.layers.{i}.{mg_linear}"] for r in reference]
            for seg_name, hf_module in segs.items():
                betas = [e["segments"][seg_name] for e in entries]
                assert all(torch.equal(b, betas[0]) for b in betas), "beta differs across ranks"
                beta = betas[0].to(torch.float32)
                scale = tensors[f"model.layers.{i}.{hf_module}.weight_scale"]
                assert scale.shape == (1,) and scale.dtype == torch.float32
                if linear_class == "bitlinear":
                    expected = torch.ones((), dtype=torch.float32) / beta
                else:
                    expected = beta
                assert torch.equal(scale[0], expected), (i, hf_module, scale, beta)
                checked += 1
                norm = entries[0]["rms_norm"]
                key = f"model.layers.{i}.{hf_module}.rms_norm.weight"
                if norm is None:
                    assert key not in tensors
                    continue
                parts = [e["rms_norm"] for e in entries]
                if mg_linear.endswith(ROW_PARALLEL):
                    full = torch.cat(parts, dim=0)  # split like the input features
                else:
                    assert all(torch.equal(p, parts[0]) for p in parts)
                    full = parts[0]
                assert torch.equal(tensors[key], full), key
    return checked


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_pack_layout_matches_transformers(tool, eager_transformers):
    """Our packing is transformers' layout: its unpack_weights / pack_weights agree."""
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    t = torch.randint(-1, 2, (24, 7), generator=torch.Generator().manual_seed(3)).to(torch.int8)
    packed = tool.pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 7)
    assert torch.equal(tool.unpack_ternary(packed), t)
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), t.float())
    assert torch.equal(pack_weights(t.clone()), packed)
    # Row i*R + r sits in bits 2i, 2i+1 of packed row r (R = rows / 4).
    assert int((packed[1, 0] >> 4) & 3) == int(t[2 * 6 + 1, 0]) + 1
    with pytest.raises(tool.ConversionError, match="multiple of 4"):
        tool.pack_ternary(t[:10])


# ------------------------------------------------------------------------------------------------
# GPT -> Llama
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt_tp1", "gpt_tp2_rms"])
def test_gpt_bitnet_export_matches_megatron(
    tool, layouts, checkpoints, references, tokens, tmp_path, eager_transformers, name
):
    from transformers.integrations.bitnet import BitLinear

    _, tp, overrides = CASES[name]
    rms = bool(overrides.get("--bitnet-rms-norm"))
    reference = references(name)
    out = tmp_path / "hf"
    assert _export(tool, checkpoints(name), out) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitnet" and qc["linear_class"] == "bitlinear"
    assert qc["quantization_mode"] == "offline" and qc["modules_to_not_convert"] == ["lm_head"]
    assert qc["use_rms_norm"] is rms

    model = _load_hf(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, BitLinear) and isinstance(
        model.model.layers[1].mlp.down_proj, BitLinear
    )
    assert (attn.q_proj.rms_norm is not None) is rms
    assert type(model.lm_head) is torch.nn.Linear
    assert model.config.head_dim == 16 and model.config.num_key_value_heads == 2
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    _assert_logits_match(model, reference, tokens, name)

    tensors = _read(out)
    ternary = _unpacked(tool, tensors)
    dims = tool.check_gpt_args(_args(checkpoints(name)))
    for i in range(dims.num_layers):
        ranks = _gpt_hf_to_megatron_ranks(layouts, ternary, f"model.layers.{i}.", dims, tp)
        for mg_linear, shards in ranks.items():
            for r in range(tp):
                t_mg = reference[r]["layers"][f"decoder.layers.{i}.{mg_linear}"]["t"]
                assert torch.equal(shards[r], t_mg), (i, mg_linear, r)
    checked = _check_scales_and_norms(
        tensors, reference, GPT_SEGMENTS, dims.num_layers, "bitlinear"
    )
    assert checked == 7 * dims.num_layers


def test_gpt_autobitlinear_export(
    tool, checkpoints, references, tokens, tmp_path, eager_transformers
):
    """AutoBitLinear (offline): packed weights unpacked at load, weight_scale = beta."""
    from transformers.integrations.bitnet import AutoBitLinear

    name = "gpt_tp2_rms"
    out = tmp_path / "hf"
    assert _export(tool, checkpoints(name), out, "--linear-class", "autobitlinear") == 0
    model = _load_hf(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, AutoBitLinear) and not q_proj.online_quant
    tensors = _read(out)
    assert torch.equal(
        q_proj.weight.to(torch.int8),
        tool.unpack_ternary(tensors["model.layers.0.self_attn.q_proj.weight"]),
    )
    _assert_logits_match(model, references(name), tokens, name + " autobitlinear")
    _check_scales_and_norms(tensors, references(name), GPT_SEGMENTS, 2, "autobitlinear")


def test_gpt_dense_export(tool, layouts, checkpoints, references, tmp_path, eager_transformers):
    """--format dense: a plain LlamaForCausalLM with weights beta*T (fp32 and bf16); the bf16
    export goes through the wrapper script."""
    from transformers import LlamaForCausalLM

    name = "gpt_tp1"
    reference = references(name)
    out = tmp_path / "dense"
    assert _export(tool, checkpoints(name), out, "--format", "dense") == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = _load_hf(out)
    assert type(model) is LlamaForCausalLM
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear

    out16 = tmp_path / "dense_bf16"
    env = dict(os.environ, FALCON_MCORE_BUILD=str(megatron_path()), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "export_bitnet_hf.sh"), "--load-dir",
         str(checkpoints(name)), "--save-dir", str(out16), "--format", "dense", "--dtype",
         "bf16", "--quiet"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense16 = _read(out16)
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"

    dims = tool.check_gpt_args(_args(checkpoints(name)))
    sd = model.state_dict()
    for i in range(dims.num_layers):
        for mg_linear, segs in GPT_SEGMENTS.items():
            entry = reference[0]["layers"][f"decoder.layers.{i}.{mg_linear}"]
            # Megatron's dequantised weight beta*T (per-row beta), in the HF layout.
            wq = entry["t"].to(torch.float32) * entry["beta"].reshape(-1, 1)
            if mg_linear.endswith("linear_qkv"):
                parts = dict(zip("qkv", layouts.qkv_to_hf(wq, dims)))
            elif mg_linear.endswith("linear_fc1"):
                parts = {"gate": wq[: dims.ffn], "up": wq[dims.ffn :]}
            else:
                parts = {"weight": wq}
            for seg, hf_module in segs.items():
                key = f"model.layers.{i}.{hf_module}.weight"
                assert torch.equal(sd[key], parts[seg]), key
                assert dense16[key].dtype == torch.bfloat16
                assert torch.equal(dense16[key], parts[seg].to(torch.bfloat16)), key
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()


def test_vocab_size_trims_padding_rows(
    tool, checkpoints, references, tokens, tmp_path, eager_transformers
):
    """--vocab-size keeps the first rows of the embedding and output layer (Megatron pads the
    vocabulary); the logits are Megatron's first columns."""
    name, vocab = "gpt_tp1", 1000
    out = tmp_path / "hf"
    assert _export(tool, checkpoints(name), out, "--vocab-size", vocab) == 0
    tensors = _read(out)
    assert tensors["model.embed_tokens.weight"].shape[0] == vocab
    assert tensors["lm_head.weight"].shape[0] == vocab
    model = _load_hf(out)
    assert model.config.vocab_size == vocab
    with torch.no_grad():
        logits = model(input_ids=tokens.clamp(max=vocab - 1)).logits
    ref = references(name)[0]["logits"]
    assert logits.shape[-1] == vocab
    # Tokens >= vocab were clamped for HF only: compare the positions before the first one.
    ok = (tokens < vocab).cumprod(dim=1).bool()
    assert ok.sum() > 0
    _assert_logits_close(logits[ok], ref[..., :vocab][ok], ref.abs().max().item(), name)
    assert _export(tool, checkpoints(name), tmp_path / "big", "--vocab-size", VOCAB + 1) == 2


def test_torch_dist_export_equals_legacy(tool, checkpoints, references, work, tmp_path):
    """The torch_dist checkpoint Megatron saves from the TP=2 world exports to the same
    tensors and config as the legacy checkpoint of that world."""
    name = "gpt_tp2_rms"
    references(name)  # saves work / "gpt_tp2_rms_dist"
    legacy, dist = tmp_path / "legacy", tmp_path / "dist"
    assert _export(tool, checkpoints(name), legacy) == 0
    assert _export(tool, work / f"{name}_dist", dist) == 0
    a, b = _read(legacy), _read(dist)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((legacy / "config.json").read_text()) == json.loads(
        (dist / "config.json").read_text()
    )


# ------------------------------------------------------------------------------------------------
# Falcon-H1
# ------------------------------------------------------------------------------------------------


def test_falcon_h1_bitnet_export_matches_megatron(
    tool, layouts, config_mapping, checkpoints, references, tokens, tmp_path, eager_transformers
):
    from transformers.integrations.bitnet import BitLinear

    name = "falcon_rms"
    reference = references(name)
    out = tmp_path / "hf"
    assert _export(tool, checkpoints(name), out) == 0
    model = _load_hf(out)
    assert type(model).__name__ == "FalconH1ForCausalLM"
    layer = model.model.layers[0]
    for module in (layer.mamba.in_proj, layer.mamba.out_proj, layer.self_attn.k_proj,
                   layer.feed_forward.up_proj):  # fmt: skip
        assert isinstance(module, BitLinear) and module.rms_norm is not None
    assert type(model.lm_head) is torch.nn.Linear
    assert model.config.quantization_config.use_rms_norm is True
    assert model.config.lm_head_multiplier == 0.0390625  # the case's muP multipliers
    _assert_logits_match(model, reference, tokens, name)

    tensors = _read(out)
    ternary = _unpacked(tool, tensors)
    settings, _ = config_mapping.settings_from_megatron_args(_args(checkpoints(name)))
    dims = settings.dims
    hf_linears = {m for segs in FALCON_SEGMENTS.values() for m in segs.values()}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        layer_tensors = {
            k[len(p) :]: v for k, v in tensors.items() if k.startswith(p) and "rms_norm" not in k
        }
        for module in hf_linears:
            layer_tensors[module + ".weight"] = ternary[p + module]
        (mg,) = layouts.hf_layer_to_megatron(layer_tensors, dims, 1)
        for mg_linear in FALCON_SEGMENTS:
            t_mg = reference[0]["layers"][f"decoder.layers.{i}.{mg_linear}"]["t"]
            assert torch.equal(mg[mg_linear + ".weight"], t_mg), (i, mg_linear)
    checked = _check_scales_and_norms(
        tensors, reference, FALCON_SEGMENTS, dims.num_layers, "bitlinear"
    )
    assert checked == 9 * dims.num_layers


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


def _modified_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the TP=1 legacy checkpoint ``src`` whose rank file went through ``edit``."""
    shutil.copytree(src, dst)
    (f,) = dst.glob("iter_*/mp_rank_00/model_optim_rng.pt")
    state = torch.load(f, weights_only=False)
    edit(state)
    torch.save(state, f)
    return dst


def test_refuses_to_overwrite_without_force(tool, checkpoints, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _export(tool, checkpoints("gpt_tp1"), out) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert _export(tool, checkpoints("gpt_tp1"), out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_refuses_non_bitnet_and_unsupported_checkpoints(tool, checkpoints, tmp_path, capsys):
    src = checkpoints("gpt_tp1")

    def set_arg(name, value):
        return lambda state: setattr(state["args"], name, value)

    cases = [
        (set_arg("use_bitnet", False), [], "not a BitNet checkpoint"),
        (set_arg("qk_layernorm", True), [], "qk_layernorm=True"),
        (set_arg("rotary_interleaved", True), [], "rotary_interleaved=True"),
        (set_arg("key_multiplier", 0.5), [], "key_multiplier"),
        (set_arg("untie_embeddings_and_output_weights", False), [], "untie_embeddings"),
        (lambda s: None, ["--model", "falcon-h1"], "describe a gpt"),
        (set_arg("bitnet_rms_norm", True), ["--format", "dense"], "cannot represent"),
        (
            lambda s: s["model"].pop("decoder.layers.1.mlp.linear_fc2.weight"),
            [],
            "missing tensor.*linear_fc2",
        ),
    ]
    for k, (edit, extra, message) in enumerate(cases):
        ckpt = _modified_copy(src, tmp_path / f"ckpt{k}", edit)
        out = tmp_path / f"out{k}"
        assert _export(tool, ckpt, out, *extra) == 2, message
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err[-2000:])
        assert not out.exists(), "a failed export left its output behind"
        assert not list(tmp_path.glob(f".out{k}.tmp-*")), "temporary directory left behind"


def test_dense_falcon_h1_converter_refuses_bitnet(
    tool, checkpoints, references, work, tmp_path, capsys
):
    """The dense Falcon-H1 converter does not read trained BitNet checkpoints as dense models
    (megatron-to-hf: the legacy Falcon-H1 one and the torch_dist one Megatron saved), nor
    BitNet HF exports (hf-to-megatron); each error names the BitNet route."""
    import falcon_h1_conversion as fc

    references("gpt_tp2_rms")  # saves work / "gpt_tp2_rms_dist"
    for k, ckpt in enumerate((checkpoints("falcon_rms"), work / "gpt_tp2_rms_dist")):
        out = tmp_path / f"dense{k}"
        assert fc.main(["megatron-to-hf", "--load-dir", str(ckpt), "--save-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is a BitNet checkpoint (trained with --use-bitnet)" in err, err
        assert "tools/checkpoint/bitnet_hf_export.py" in err and not out.exists()

    exported = tmp_path / "bitnet_hf"
    assert _export(tool, checkpoints("falcon_rms"), exported) == 0
    capsys.readouterr()
    out = tmp_path / "mg"
    assert fc.main(["hf-to-megatron", "--hf-dir", str(exported), "--save-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "quant_method 'bitnet'" in err and "this is a BitNet export" in err, err
    assert not out.exists()
