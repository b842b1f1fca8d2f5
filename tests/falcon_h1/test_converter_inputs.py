"""What the Falcon-H1 converter refuses to read, and how it says so.

* BitNet checkpoints (``--use-bitnet``) are not dense Falcon-H1 models: megatron-to-hf refuses
  them and points to the BitNet exporter (``tools/checkpoint/bitnet_hf_export.py``, which
  ``scripts/export_bitnet_hf.sh`` runs); hf-to-megatron
  refuses quantized HF exports (a BitNet export named as such). Converting the latent weights
  would silently give a model that computes something else.
* Corrupt inputs name the file: a truncated / corrupt safetensors shard, a shard the index lists
  but that is missing, an unreadable or malformed config.json or index, a truncated legacy
  Megatron file, a truncated torch_dist checkpoint -- each a clear error (exit status 2, no
  traceback) naming the file, and nothing written: no output directory, no temporary
  directory, no parent directory created for it, an existing output left as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tool
from falcon_h1.oracle import MULTIPLIERS, TinyShape, build_hf_model

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def tool():
    return checkpoint_tool("falcon_h1_conversion")


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> Path:
    """A tiny HF Falcon-H1 saved in several safetensors shards with an index."""
    out = tmp_path_factory.mktemp("hf") / "sharded"
    model = build_hf_model(TinyShape(layers=2, mamba_groups=1, rms_norm=False), MULTIPLIERS)
    model.save_pretrained(out, max_shard_size="100KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def megatron_ckpts(tool, hf_sharded, tmp_path_factory) -> dict:
    """The sharded model converted to both Megatron formats: format -> checkpoint dir."""
    root = tmp_path_factory.mktemp("mg")
    out = {}
    for fmt in ("torch", "torch_dist"):
        out[fmt] = root / fmt
        assert _run(tool, "hf-to-megatron", "--hf-dir", hf_sharded, "--save-dir", out[fmt],
                    "--ckpt-format", fmt) == 0  # fmt: skip
    return out


def _run(tool, *argv) -> int:
    return tool.main([*map(str, argv), "--quiet"])


def _error(capsys) -> str:
    return capsys.readouterr().err


def _assert_nothing_written(parent: Path, out: Path, err: str) -> None:
    assert "nothing was written" in err, err
    assert "Traceback" not in err
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers


# ------------------------------------------------------------------------------------------------
# BitNet checkpoints are not dense Falcon-H1
# ------------------------------------------------------------------------------------------------


def _as_bitnet(src: Path, dst: Path) -> Path:
    """A copy of a converted legacy checkpoint whose args say --use-bitnet (the tensors of a
    BitNet Falcon-H1 without --bitnet-rms-norm are exactly these). Checkpoints trained with
    --use-bitnet, also torch_dist ones, are refused in tests/bitnet_export."""
    shutil.copytree(src, dst)
    path = dst / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["args"].use_bitnet = True
    torch.save(state, path)
    return dst


def test_megatron_to_hf_refuses_bitnet_checkpoints(tool, megatron_ckpts, tmp_path, capsys):
    # The unmodified checkpoint converts (the refusal below is about BitNet, nothing else).
    assert _run(tool, "megatron-to-hf", "--load-dir", megatron_ckpts["torch"], "--save-dir",
                tmp_path / "dense") == 0  # fmt: skip
    ckpt = _as_bitnet(megatron_ckpts["torch"], tmp_path / "bitnet")
    out = tmp_path / "hf"
    assert _run(tool, "megatron-to-hf", "--load-dir", ckpt, "--save-dir", out) == 2
    err = _error(capsys)
    assert "is a BitNet checkpoint (trained with --use-bitnet)" in err, err
    assert "tools/checkpoint/bitnet_hf_export.py" in err
    _assert_nothing_written(tmp_path, out, err)


def test_hf_to_megatron_refuses_quantized_exports(tool, hf_sharded, tmp_path, capsys):
    for method, message in (
        ("bitnet", "this is a BitNet export (tools/checkpoint/bitnet_hf_export.py"),
        ("gptq", "quant_method 'gptq'"),
    ):
        src = tmp_path / f"hf_{method}"
        shutil.copytree(hf_sharded, src)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method}
        (src / "config.json").write_text(json.dumps(config))
        out = tmp_path / f"mg_{method}"
        # Refused outright, also with --allow-unknown-config-keys.
        for extra in ([], ["--allow-unknown-config-keys"]):
            assert _run(tool, "hf-to-megatron", "--hf-dir", src, "--save-dir", out, *extra) == 2
            err = _error(capsys)
            assert "quantized HF checkpoints" in err and message in err, err
            _assert_nothing_written(tmp_path, out, err)


# ------------------------------------------------------------------------------------------------
# Corrupt inputs name the file
# ------------------------------------------------------------------------------------------------


def _corrupt_shard(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "header":
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "header", "empty"])
def test_corrupt_shard_is_named_and_nothing_is_written(tool, hf_sharded, tmp_path, capsys, how):
    src = tmp_path / "hf"
    shutil.copytree(hf_sharded, src)
    broken = sorted(src.glob("model-*.safetensors"))[1]
    _corrupt_shard(broken, how)
    # A new output in directories that do not exist yet: none of them may appear.
    out = tmp_path / "new" / "deeper" / "mg"
    assert _run(tool, "hf-to-megatron", "--hf-dir", src, "--save-dir", out) == 2
    err = _error(capsys)
    assert f"{broken} is not a readable safetensors file (truncated or corrupt?)" in err, err
    _assert_nothing_written(tmp_path, out, err)
    assert not (tmp_path / "new").exists()
    # An existing output is kept as it was, also with --force.
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    assert _run(tool, "hf-to-megatron", "--hf-dir", src, "--save-dir", existing, "--force") == 2
    assert broken.name in _error(capsys)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "user data"


def test_missing_shard_listed_in_the_index(tool, hf_sharded, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(hf_sharded, src)
    missing = sorted(src.glob("model-*.safetensors"))[-1]
    missing.unlink()
    out = tmp_path / "mg"
    assert _run(tool, "hf-to-megatron", "--hf-dir", src, "--save-dir", out) == 2
    err = _error(capsys)
    assert f"model.safetensors.index.json lists {missing.name}, which is missing" in err, err
    _assert_nothing_written(tmp_path, out, err)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("config.json", b'{"model_type": "falcon_h1", ', "cannot read {path}: Expecting"),
        ("config.json", b"\xff\xfe\x00garbage", "cannot read {path}: 'utf-8' codec"),
        ("config.json", b"[1, 2, 3]", "{path} holds a JSON list, not an object"),
        ("model.safetensors.index.json", b"{not json", "cannot read {path}: Expecting"),
        ("model.safetensors.index.json", b'{"metadata": {}}', "{path} has no weight_map"),
    ],
)
def test_unreadable_config_or_index_is_named(
    tool, hf_sharded, tmp_path, capsys, name, content, message
):
    src = tmp_path / "hf"
    shutil.copytree(hf_sharded, src)
    (src / name).write_bytes(content)
    out = tmp_path / "mg"
    assert _run(tool, "hf-to-megatron", "--hf-dir", src, "--save-dir", out) == 2
    err = _error(capsys)
    assert message.format(path=src / name) in err, err
    _assert_nothing_written(tmp_path, out, err)


def test_truncated_megatron_checkpoints_are_named(tool, megatron_ckpts, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(megatron_ckpts["torch"], legacy)
    path = legacy / "release" / "mp_rank_00" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:2000])
    out = tmp_path / "hf"
    assert _run(tool, "megatron-to-hf", "--load-dir", legacy, "--save-dir", out) == 2
    err = _error(capsys)
    assert f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?)" in err, err
    _assert_nothing_written(tmp_path, out, err)

    dist = tmp_path / "dist"
    shutil.copytree(megatron_ckpts["torch_dist"], dist)
    (data,) = (dist / "release").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    assert _run(tool, "megatron-to-hf", "--load-dir", dist, "--save-dir", out) == 2
    err = _error(capsys)
    assert f"cannot read the torch_dist checkpoint {dist / 'release'} (truncated or" in err, err
    _assert_nothing_written(tmp_path, out, err)
