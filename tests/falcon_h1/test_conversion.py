"""Falcon-H1 checkpoint conversion HF <-> Megatron (tools/checkpoint/falcon_h1_conversion.py).

* Layouts (pure): every split / merge is exact and inverse; fused QKV, Mamba in_proj / conv1d and
  fc1 are split per component and per rank.
* HF -> Megatron -> HF at TP in {1, 2} x PP in {1, 2}, legacy ``torch`` and ``torch_dist``:
  bit-identical tensors and the same config.json; bf16, sharded input and output.
* The converted checkpoint, loaded the way ``pretrain_mamba.py --use-checkpoint-args`` loads it
  (no model flags), gives HF's logits to fp32 round-off: TP=1 in this process, TP x PP worlds in
  forked gloo processes, where Megatron's own torch_dist resharding must also reproduce the
  converter's per-rank shards, and checkpoints Megatron saves from that world convert back to
  the original HF tensors.
* Every refusal: existing output, TP / PP divisibility, missing / unexpected / misshapen tensors,
  unknown and unsupported config keys, incomplete Megatron checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, checkpoint_tool, megatron_path
from falcon_h1.oracle import MULTIPLIERS, TinyShape, build_hf_model

pytestmark = pytest.mark.megatron

SEQ_LEN = 21
# n_groups 2 so that TP=2 is possible; a release-like shape (n_groups 1, no Mamba norm).
SHAPE = TinyShape(layers=4, mamba_groups=2, rms_norm=True)
SHAPE_G1 = TinyShape(layers=2, mamba_groups=1, rms_norm=False)
PARALLEL = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def tool():
    """The converter module, imported from the patched tree's tools/checkpoint."""
    return checkpoint_tool("falcon_h1_conversion")


@pytest.fixture(scope="module")
def layouts():
    return checkpoint_tool("falcon_h1_layouts")


@pytest.fixture(scope="module")
def parallel():
    return checkpoint_tool("falcon_h1_parallel")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Saved tiny HF checkpoints: name -> (directory, model, shape)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, shape, seed in (("g2", SHAPE, 0), ("g1", SHAPE_G1, 1)):
        model = build_hf_model(shape, MULTIPLIERS, seed=seed)
        model.save_pretrained(root / name)
        out[name] = (root / name, model, shape)
    return out


def _convert(tool, *argv) -> int:
    return tool.main([*map(str, argv), "--quiet"])


def _hf_to_mg(tool, hf_dir, save_dir, tp=1, pp=1, fmt="torch", *extra):
    return _convert(
        tool, "hf-to-megatron", "--hf-dir", hf_dir, "--save-dir", save_dir,
        "--target-tp", tp, "--target-pp", pp, "--ckpt-format", fmt, *extra,
    )  # fmt: skip


def _mg_to_hf(tool, load_dir, save_dir, *extra):
    return _convert(tool, "megatron-to-hf", "--load-dir", load_dir, "--save-dir", save_dir, *extra)


def _read_hf(directory: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _assert_same_hf(a: Path, b: Path) -> None:
    ta, tb = _read_hf(a), _read_hf(b)
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), f"{name} differs"
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    assert ca == cb, {
        k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)
    }


def _inputs(shape: TinyShape, model) -> dict:
    tokens = torch.randint(0, shape.vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(SEQ_LEN).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return {"tokens": tokens, "positions": positions, "hf_logits": logits, "vocab": shape.vocab}


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layout_splits_are_exact_inverses(layouts, tp):
    g = torch.Generator().manual_seed(0)
    dims = layouts.FalconH1Dims(
        num_layers=1, hidden=16, ffn=24, heads=8, kv_heads=4, head_dim=6, vocab=50,
        mamba_heads=8, mamba_head_dim=4, mamba_groups=4, d_state=3, conv_kernel=4,
        mamba_rms_norm=True,
    )  # fmt: skip
    layer = {k: torch.randn(s, generator=g) for k, s in _layer_shapes(layouts, dims).items()}
    shards = layouts.hf_layer_to_megatron(layer, dims, tp)
    back = layouts.megatron_layer_to_hf(shards, dims)
    assert set(back) == set(layer)
    for k in layer:
        assert torch.equal(back[k], layer[k]), k

    # Each rank's in_proj is its own slice of every component, in z, x, B, C, dt order.
    z, x, b, c, dt = torch.split(layer["mamba.in_proj.weight"], dims.in_proj_sizes())
    for r, shard in enumerate(shards):
        expected = torch.cat([t.chunk(tp)[r] for t in (z, x, b, c, dt)])
        assert torch.equal(shard["self_attention.mamba.in_proj.weight"], expected)
        xc, bc, cc = torch.split(layer["mamba.conv1d.weight"], dims.conv_sizes())
        expected = torch.cat([t.chunk(tp)[r] for t in (xc, bc, cc)])
        assert torch.equal(shard["self_attention.mamba.conv1d_weight"], expected)
        gate, up = layer["feed_forward.gate_proj.weight"], layer["feed_forward.up_proj.weight"]
        expected = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        assert torch.equal(shard["mlp.linear_fc1.weight"], expected)

    # Fused QKV: per query group [its query heads; key; value].
    q, k, v = (layer[f"self_attn.{n}_proj.weight"] for n in "qkv")
    qkv = layouts.qkv_from_hf(q, k, v, dims)
    per, d = dims.heads // dims.kv_heads, dims.head_dim
    rows = (per + 2) * d
    for grp in range(dims.kv_heads):
        block = qkv[grp * rows : (grp + 1) * rows]
        q = layer["self_attn.q_proj.weight"][grp * per * d : (grp + 1) * per * d]
        k = layer["self_attn.k_proj.weight"][grp * d : (grp + 1) * d]
        v = layer["self_attn.v_proj.weight"][grp * d : (grp + 1) * d]
        assert torch.equal(block, torch.cat([q, k, v]))
    # Shards own their storage (a view would make torch.save write the whole parent tensor).
    for shard in shards:
        for t in shard.values():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("tp", [2, 4])
def test_layout_with_more_ranks_than_groups(layouts, parallel, tp):
    """One Mamba group and one KV head shared by ``tp`` ranks: every component is still split
    evenly (rank r holds d_state / tp rows of B and of C, and the r-th row block of the fused
    QKV), and the split is exactly inverted."""
    g = torch.Generator().manual_seed(1)
    dims = layouts.FalconH1Dims(
        num_layers=1, hidden=16, ffn=24, heads=4, kv_heads=1, head_dim=6, vocab=50,
        mamba_heads=8, mamba_head_dim=4, mamba_groups=1, d_state=8, conv_kernel=4,
        mamba_rms_norm=True,
    )  # fmt: skip
    parallel.check_tensor_parallel(dims, tp)
    layer = {k: torch.randn(s, generator=g) for k, s in _layer_shapes(layouts, dims).items()}
    shards = layouts.hf_layer_to_megatron(layer, dims, tp)
    back = layouts.megatron_layer_to_hf(shards, dims)
    for k in layer:
        assert torch.equal(back[k], layer[k]), k
    z, x, b, c, dt = torch.split(layer["mamba.in_proj.weight"], dims.in_proj_sizes())
    qkv = layouts.qkv_from_hf(*(layer[f"self_attn.{n}_proj.weight"] for n in "qkv"), dims)
    for r, shard in enumerate(shards):
        in_proj = shard["self_attention.mamba.in_proj.weight"]
        assert in_proj.shape[0] == (2 * 32 + 2 * 8 + 8) // tp
        expected = torch.cat([t.chunk(tp)[r] for t in (z, x, b, c, dt)])
        assert torch.equal(in_proj, expected)
        assert torch.equal(shard["self_attention.attention.linear_qkv.weight"], qkv.chunk(tp)[r])
    odd = layouts.FalconH1Dims(**{**dims.to_dict(), "d_state": 6})
    with pytest.raises(parallel.ConversionError, match="mamba_d_state=6 B / C rows evenly"):
        parallel.check_tensor_parallel(odd, 4)


def _layer_shapes(layouts, dims) -> dict:
    full = layouts.hf_shapes(dims)
    return {
        k[len("model.layers.0.") :]: s for k, s in full.items() if k.startswith("model.layers.0.")
    }


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("tp,pp", PARALLEL)
def test_round_trip_is_bit_identical(tool, hf_models, tmp_path, fmt, tp, pp):
    hf_dir = hf_models["g2"][0]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg", tp, pp, fmt) == 0
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    if fmt == "torch":
        ranks = sorted(p.name for p in (tmp_path / "mg" / "release").iterdir())
        suffix = [f"_{s:03d}" for s in range(pp)] if pp > 1 else [""]
        assert ranks == sorted(f"mp_rank_{r:02d}{s}" for r in range(tp) for s in suffix)
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf") == 0
    _assert_same_hf(hf_dir, tmp_path / "hf")


def test_shared_reader_merges_extra_layer_tensors(tool, hf_models, tmp_path):
    """The reader the converter and the BitNet exporter share, at TP=2 PP=2: HF tensors equal
    the source's, and each extra per-layer tensor (the BitNet exporter's input norms) comes back
    whole: a replicated one as rank 0's copy, a split one concatenated along dim 0. Replicated
    tensors that differ between ranks are refused."""
    import conversion_io
    from falcon_h1_checkpoint import FalconH1Checkpoint

    hf_dir, model, _ = hf_models["g2"]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg", 2, 2, "torch") == 0
    reader = conversion_io.open_megatron_checkpoint(tmp_path / "mg")
    g = torch.Generator().manual_seed(5)
    whole = {}
    for (r, s), state in reader.models.items():
        for local in range(2):
            i = 2 * s + local
            whole.setdefault(i, (torch.randn(6, generator=g), torch.randn(2, 4, generator=g)))
            state[f"decoder.layers.{local}.rep.weight"] = whole[i][0].clone()
            state[f"decoder.layers.{local}.split.weight"] = whole[i][1][r : r + 1].clone()
    ckpt = FalconH1Checkpoint(reader, extra_layer_keys={"rep.weight": True, "split.weight": False})
    source = model.state_dict()
    for i in range(4):
        layer, extra = ckpt.layer(i)
        for name, tensor in layer.items():
            assert torch.equal(tensor, source[f"model.layers.{i}.{name}"]), (i, name)
        assert torch.equal(extra["rep.weight"], whole[i][0])
        assert torch.equal(extra["split.weight"], whole[i][1])
    reader.models[(1, 1)]["decoder.layers.0.rep.weight"] += 1
    with pytest.raises(conversion_io.ConversionError, match="rep.weight differs between TP rank"):
        ckpt.layer(2)
    norm = "decoder.layers.1.input_layernorm.weight"  # replicated Falcon-H1 tensors too
    reader.models[(1, 0)][norm] = reader.models[(1, 0)][norm] + 1
    with pytest.raises(conversion_io.ConversionError, match="input_layernorm.weight differs"):
        ckpt.layer(1)


def test_checkpoint_args_record_the_model(tool, hf_models, tmp_path):
    """The args carry every model setting (all 14 multipliers) as Megatron parsed them."""
    hf_dir, _, shape = hf_models["g2"]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg", 2, 2, "torch") == 0
    state = torch.load(
        tmp_path / "mg/release/mp_rank_01_001/model_optim_rng.pt", weights_only=False
    )
    args = state["args"]
    for name, value in MULTIPLIERS.items():
        assert getattr(args, name) == value, name
    assert args.hybrid_layer_pattern == "PP|PP"
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.hidden_size, args.ffn_hidden_size, args.kv_channels) == (64, 96, 24)
    assert (args.num_attention_heads, args.num_query_groups) == (shape.heads, shape.kv_heads)
    assert (args.mamba_num_heads, args.mamba_head_dim) == (shape.mamba_heads, shape.mamba_head_dim)
    assert (args.mamba_num_groups, args.mamba_state_dim) == (shape.mamba_groups, shape.d_state)
    assert (args.mamba_chunk_size, args.mamba_conv_kernel) == (shape.chunk, shape.conv)
    assert args.mamba_rms_norm is True and args.rotary_base == int(shape.rope_theta)
    assert args.untie_embeddings_and_output_weights and args.swiglu and not args.add_bias_linear
    assert args.padded_vocab_size == 256 and args.params_dtype == torch.float32


def test_uneven_pipeline_split(tool, hf_models, tmp_path):
    hf_dir = hf_models["g2"][0]
    assert (
        _hf_to_mg(tool, hf_dir, tmp_path / "mg", 1, 3, "torch", "--target-pp-layers", "2,1,1") == 0
    )
    state = torch.load(
        tmp_path / "mg/release/mp_rank_00_000/model_optim_rng.pt", weights_only=False
    )
    assert state["args"].hybrid_layer_pattern == "PP|P|P"
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf") == 0
    _assert_same_hf(hf_dir, tmp_path / "hf")


def test_bf16_sharded_input_and_output(tool, tmp_path):
    """bf16 sharded HF checkpoint (with index) -> Megatron -> sharded HF that transformers loads."""
    from transformers import FalconH1ForCausalLM

    model = build_hf_model(SHAPE, MULTIPLIERS, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert _hf_to_mg(tool, tmp_path / "hf", tmp_path / "mg", 2, 1, "torch_dist") == 0
    shard_gib = 60e3 / 2**30
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "out", "--max-shard-size", shard_gib) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_hf(tmp_path / "hf", out)
    loaded = FalconH1ForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_dtype_cast_on_export(tool, hf_models, tmp_path):
    hf_dir = hf_models["g1"][0]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg") == 0
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf", "--dtype", "bf16") == 0
    original, exported = _read_hf(hf_dir), _read_hf(tmp_path / "hf")
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


# ------------------------------------------------------------------------------------------------
# Loading like training does, and logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("name", ["g2", "g1"])
def test_tp1_logits_match_hf_in_process(
    tool, hf_models, tmp_path, single_rank_model_parallel, fmt, name
):
    """--use-checkpoint-args load at TP=1 (no model flags) reproduces HF's logits."""
    from falcon_h1 import conv_workers

    hf_dir, model, shape = hf_models[name]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg", 1, 1, fmt) == 0
    args, mg = conv_workers.load_converted(tmp_path / "mg", fmt)
    data = _inputs(shape, model)
    with torch.no_grad():
        logits = mg(input_ids=data["tokens"], position_ids=data["positions"], attention_mask=None)
    assert logits.shape[-1] == args.padded_vocab_size
    diff = (logits[..., : shape.vocab] - data["hf_logits"]).abs().max().item()
    assert diff <= 1e-5, f"logits max abs diff {diff:.3e}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_load_logits_and_resharding(tool, hf_models, tmp_path, tp, pp):
    """TP x PP world: logits, Megatron's torch_dist resharding == converter shards, re-export."""
    import torch.distributed as dist
    from falcon_h1 import conv_workers

    assert not dist.is_initialized()
    hf_dir, model, shape = hf_models["g2"]
    torch.save(_inputs(shape, model), tmp_path / "inputs.pt")
    assert _hf_to_mg(tool, hf_dir, tmp_path / "legacy", tp, pp, "torch") == 0
    assert _hf_to_mg(tool, hf_dir, tmp_path / "dist", tp, pp, "torch_dist") == 0
    spec = {
        "work": str(tmp_path),
        "legacy_dir": str(tmp_path / "legacy"),
        "dist_dir": str(tmp_path / "dist"),
        "megatron_dist_save": (tp, pp) == (2, 2),
    }
    results = conv_workers.run_world(tp, pp, spec)
    diffs = [r["max_abs_diff"] for r in results if "max_abs_diff" in r]
    assert len(diffs) == 1 and diffs[0] <= 1e-5, diffs
    for r in results:
        assert r["torch_dist_mismatches"] == [], r["torch_dist_mismatches"]

    # What Megatron saved from this world converts back to the original tensors.
    kinds = ["legacy", "dist"] if spec["megatron_dist_save"] else ["legacy"]
    for kind in kinds:
        saved, back = tmp_path / f"megatron_{kind}_{tp}x{pp}", tmp_path / f"back_{kind}"
        assert _mg_to_hf(tool, saved, back, "--hf-config", hf_dir) == 0
        _assert_same_hf(hf_dir, back)


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------


def _error(capsys) -> str:
    return capsys.readouterr().err


def _leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refuses_to_overwrite_without_force(tool, hf_models, tmp_path, capsys):
    hf_dir = hf_models["g1"][0]
    out = tmp_path / "mg"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert _hf_to_mg(tool, hf_dir, out) == 2
    assert "--force" in _error(capsys)
    assert (out / "keep.txt").read_text() == "user data"
    assert _hf_to_mg(tool, hf_dir, out, 1, 1, "torch", "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "release").is_dir()
    assert _leftovers(tmp_path) == []
    for target in (out, out / "release" / "hf", tmp_path):  # never over or around its input
        assert _mg_to_hf(tool, out, target, "--force") == 2
        assert "overlaps the input" in _error(capsys)
    assert (out / "release").is_dir()


def test_failed_conversion_leaves_no_output(tool, hf_models, tmp_path, monkeypatch):
    hf_dir = hf_models["g1"][0]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg") == 0

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tool.SafetensorsWriter, "finish", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


def test_refuses_indivisible_parallelism(tool, hf_models, tmp_path, capsys):
    # TP=3 divides neither the 4 attention heads nor the 8 Mamba heads; the 2 KV heads and
    # 2 Mamba groups neither divide 3 nor are divided by it.
    assert _hf_to_mg(tool, hf_models["g2"][0], tmp_path / "a", 3, 1) == 2
    err = _error(capsys)
    assert "TP=3 does not divide num_attention_heads=4, mamba_n_heads=8" in err
    assert "num_key_value_heads (query groups)=2 (nor is TP a multiple of it)" in err
    assert "mamba_n_groups=2 (nor is TP a multiple of it)" in err
    assert _hf_to_mg(tool, hf_models["g2"][0], tmp_path / "b", 1, 3) == 2
    assert "PP=3 does not divide num_hidden_layers=4" in _error(capsys)
    assert (
        _hf_to_mg(
            tool, hf_models["g2"][0], tmp_path / "c", 1, 2, "torch", "--target-pp-layers", "3,2"
        )
        == 2
    )
    assert "summing to 4" in _error(capsys)
    assert not any((tmp_path / n).exists() for n in "abc")


def _edited_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_refuses_missing_unexpected_or_misshapen_tensors(tool, hf_models, tmp_path, capsys):
    src = hf_models["g1"][0]
    bad = _edited_copy(src, tmp_path / "missing", lambda t: t.pop("model.layers.1.mamba.D"))
    assert _hf_to_mg(tool, bad, tmp_path / "out") == 2
    assert "missing tensor(s): model.layers.1.mamba.D" in _error(capsys)

    def add(t):
        t["model.layers.0.mamba.extra.weight"] = torch.zeros(3)

    bad = _edited_copy(src, tmp_path / "unexpected", add)
    assert _hf_to_mg(tool, bad, tmp_path / "out") == 2
    assert "unexpected tensor(s): model.layers.0.mamba.extra.weight" in _error(capsys)

    bad = _edited_copy(
        src, tmp_path / "shape", edit_config=lambda c: c.update(intermediate_size=80)
    )
    assert _hf_to_mg(tool, bad, tmp_path / "out") == 2
    assert "feed_forward.gate_proj.weight has shape (96, 64), config implies (80, 64)" in _error(
        capsys
    )
    assert not (tmp_path / "out").exists()


def test_refuses_unknown_or_unsupported_config(tool, hf_models, tmp_path, capsys):
    src = hf_models["g1"][0]
    bad = _edited_copy(src, tmp_path / "unknown", edit_config=lambda c: c.update(new_knob=3))
    assert _hf_to_mg(tool, bad, tmp_path / "out") == 2
    assert "new_knob" in _error(capsys)
    # Accepted on request, and carried over unchanged.
    assert _hf_to_mg(tool, bad, tmp_path / "mg", 1, 1, "torch", "--allow-unknown-config-keys") == 0
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["new_knob"] == 3

    unsupported = [
        ("tie_word_embeddings", True),
        ("mamba_norm_before_gate", True),
        ("hidden_act", "gelu"),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    ]
    for i, (key, value) in enumerate(unsupported):
        bad = _edited_copy(
            src, tmp_path / f"unsupported{i}", edit_config=lambda c: c.update({key: value})
        )
        assert _hf_to_mg(tool, bad, tmp_path / "out") == 2
        err = _error(capsys)
        assert "unsupported" in err and key.split("_")[0] in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_incomplete_megatron_checkpoints(tool, hf_models, tmp_path, capsys):
    hf_dir = hf_models["g2"][0]
    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg", 2, 2, "torch") == 0
    shutil.rmtree(tmp_path / "mg" / "release" / "mp_rank_01_001")
    assert _mg_to_hf(tool, tmp_path / "mg", tmp_path / "hf") == 2
    assert "TP=2 PP=2" in _error(capsys)

    assert _hf_to_mg(tool, hf_dir, tmp_path / "mg2", 1, 1, "torch") == 0
    path = tmp_path / "mg2" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.self_attention.mamba.surprise"] = torch.zeros(2)
    del state["model"]["decoder.layers.3.mlp.linear_fc2.weight"]
    torch.save(state, path)
    assert _mg_to_hf(tool, tmp_path / "mg2", tmp_path / "hf") == 2
    err = _error(capsys)
    assert "missing tensor(s): decoder.layers.3.mlp.linear_fc2.weight" in err
    assert "unexpected tensor(s): decoder.layers.0.self_attention.mamba.surprise" in err

    state = torch.load(path, weights_only=False)
    state["args"].swiglu = False
    torch.save(state, path)
    assert _mg_to_hf(tool, tmp_path / "mg2", tmp_path / "hf") == 2
    assert "swiglu=False" in _error(capsys)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------
# The documented command
# ------------------------------------------------------------------------------------------------


def test_wrapper_script(hf_models, tmp_path):
    env = dict(os.environ, FALCON_MCORE_BUILD=str(megatron_path()), PYTHON=sys.executable)
    script = ROOT / "scripts" / "convert_falcon_h1.sh"
    hf_dir = hf_models["g1"][0]
    run = subprocess.run(
        ["bash", str(script), "hf-to-megatron", "--hf-dir", str(hf_dir), "--save-dir",
         str(tmp_path / "mg"), "--target-tp", "1", "--target-pp", "2", "--ckpt-format", "torch"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "mg" / "release" / "mp_rank_00_001" / "model_optim_rng.pt").is_file()
