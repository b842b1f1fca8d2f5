"""A converted Falcon-H1 whose vocabulary Megatron pads computes HF's loss (fp32, CPU).

HF's vocabulary of 100 is padded by Megatron to 128 (TP=1) or 256 (TP=2: 128 per rank, so the
second rank's slice is all padding). The converter fills the padding rows of the output layer
with zeros and records ``--unpadded-vocab-size 100`` in the checkpoint args; loaded with
``--use-checkpoint-args`` the padded logits are masked out of the softmax, so the loss equals
HF's, and the logits the model returns for those ids are the dtype's lowest value. Without the
option (upstream behaviour) the zero logits of the padding rows enter the softmax and the loss
differs.

Tolerance: the real logits agree with HF's to fp32 round-off, <= 1e-5 (as in
test_conversion.py). Cross entropy moves by at most 2 x the largest logit change (its gradient,
softmax - one-hot, has L1 norm <= 2), so the mean losses may differ by up to 2e-5.
"""

from __future__ import annotations


import pytest
import torch
from conftest import checkpoint_tool
from falcon_h1.oracle import MULTIPLIERS, TinyShape, build_hf_model

pytestmark = pytest.mark.megatron

VOCAB = 100
SEQ_LEN = 21
LOSS_TOL = 2e-5  # see the module docstring


@pytest.fixture(scope="module")
def tool():
    return checkpoint_tool("falcon_h1_conversion")


def _convert(tool, hf_dir, save_dir, tp):
    argv = [
        "hf-to-megatron", "--hf-dir", hf_dir, "--save-dir", save_dir, "--target-tp", tp,
        "--target-pp", 1, "--ckpt-format", "torch", "--quiet",
    ]  # fmt: skip
    assert tool.main([str(a) for a in argv]) == 0


def _data(shape, model) -> dict:
    """Tokens, Megatron labels (next token; the last position has none) and HF's loss."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, shape.vocab, (2, SEQ_LEN), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.zeros(2, 1, dtype=tokens.dtype)], dim=1)
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens)  # HF shifts the labels itself
    positions = torch.arange(SEQ_LEN).unsqueeze(0).expand(2, -1)
    return {
        "tokens": tokens,
        "labels": labels,
        "positions": positions,
        "hf_loss": out.loss.item(),
        "hf_logits": out.logits,
    }


def _mean_loss(per_token: torch.Tensor) -> float:
    return per_token[:, :-1].double().mean().item()  # HF's tokens: all but the last position


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_vocab")
    out = {}
    for name, shape in (
        ("g1", TinyShape(vocab=VOCAB, mamba_groups=1)),
        ("g2", TinyShape(vocab=VOCAB, mamba_groups=2)),  # n_groups 2: convertible at TP=2
    ):
        model = build_hf_model(shape, MULTIPLIERS, seed=5)
        model.save_pretrained(root / name)
        out[name] = (root / name, model, shape)
    return out


def test_tp1_loss_equals_hf_with_the_recorded_option(
    tool, hf_models, tmp_path, single_rank_model_parallel
):
    from falcon_h1 import conv_workers

    hf_dir, model, shape = hf_models["g1"]
    _convert(tool, hf_dir, tmp_path / "mg", 1)
    data = _data(shape, model)

    args, mg = conv_workers.load_converted(tmp_path / "mg", "torch")
    assert (args.unpadded_vocab_size, args.padded_vocab_size) == (VOCAB, 128)
    assert mg.config.unpadded_vocab_size == VOCAB
    mg.eval()
    with torch.no_grad():
        loss = mg(data["tokens"], data["positions"], None, labels=data["labels"])
        logits = mg(data["tokens"], data["positions"], None)
    assert abs(_mean_loss(loss) - data["hf_loss"]) <= LOSS_TOL, (_mean_loss(loss), data["hf_loss"])
    assert (logits[..., :VOCAB] - data["hf_logits"]).abs().max().item() <= 1e-5
    assert torch.all(logits[..., VOCAB:] == torch.finfo(logits.dtype).min)

    # Upstream behaviour (option off): the 28 zero logits join the softmax.
    _, plain = conv_workers.load_converted(
        tmp_path / "mg", "torch", args_override={"unpadded_vocab_size": None}
    )
    plain.eval()
    with torch.no_grad():
        plain_loss = plain(data["tokens"], data["positions"], None, labels=data["labels"])
        plain_logits = plain(data["tokens"], data["positions"], None)
    assert torch.all(plain_logits[..., VOCAB:] == 0)
    assert _mean_loss(plain_loss) - data["hf_loss"] > 1e-2


def test_tp2_each_rank_masks_its_vocabulary_slice(tool, hf_models, tmp_path):
    import torch.distributed as dist

    from falcon_h1 import padded_vocab_workers

    assert not dist.is_initialized()
    hf_dir, model, shape = hf_models["g2"]
    _convert(tool, hf_dir, tmp_path / "mg", 2)
    data = _data(shape, model)
    torch.save(data, tmp_path / "inputs.pt")
    ranks = padded_vocab_workers.run_world(2, {"work": str(tmp_path), "ckpt": str(tmp_path / "mg")})

    lowest = torch.finfo(torch.float32).min
    for r in ranks:
        assert r["masked"]["args_unpadded"] == VOCAB
        # The loss is reduced over the TP group: every rank has the same, HF's.
        masked = _mean_loss(r["masked"]["loss"])
        assert abs(masked - data["hf_loss"]) <= LOSS_TOL, (masked, data["hf_loss"])
        assert _mean_loss(r["unmasked"]["loss"]) - data["hf_loss"] > 1e-2
    # Padded ids 100..255: rank 0 holds 0..127, rank 1 holds 128..255 (all padding).
    first, second = (r["masked"]["logits"] for r in sorted(ranks, key=lambda r: r["tp_rank"]))
    assert first.shape[-1] == second.shape[-1] == 128
    assert (first[..., :VOCAB] - data["hf_logits"]).abs().max().item() <= 1e-5
    assert torch.all(first[..., VOCAB:] == lowest) and torch.all(second == lowest)
    assert torch.all(ranks[1]["unmasked"]["logits"] == 0)
