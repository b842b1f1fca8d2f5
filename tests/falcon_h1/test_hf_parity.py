"""A tiny Falcon-H1 built in Megatron reproduces HF FalconH1ForCausalLM (fp32, CPU).

Same weights in both (mapped by ``oracle.hf_to_megatron_state_dict``); logits must agree to
fp32 round-off (max abs diff <= 1e-5) and the gradients of every parameter must match.
"""

from __future__ import annotations

import pytest
import torch

from falcon_h1.oracle import (
    MULTIPLIERS,
    TinyShape,
    build_hf_model,
    build_megatron_model,
    hf_to_megatron_state_dict,
    load_hf_weights,
    megatron_config,
)

pytestmark = pytest.mark.megatron

SEQ_LEN = 21  # not a multiple of the chunk size (8)
# More tokens (2 x 45) than the hidden size (64): projections fold their multipliers into the
# weight rows instead of scaling the output (forward_multipliers); 45 is no multiple of 8 either.
LONG_SEQ_LEN = 45
BATCH = 2


def _run_pair(
    shape: TinyShape, multipliers: dict, mem_eff_path: bool = True, seq_len: int = SEQ_LEN
):
    hf = build_hf_model(shape, multipliers)
    config = megatron_config(shape, multipliers, use_mamba_mem_eff_path=mem_eff_path)
    mg = build_megatron_model(shape, config)
    load_hf_weights(mg, hf.state_dict(), shape)  # strict: raises on missing / unexpected keys

    tokens = torch.randint(
        0, shape.vocab, (BATCH, seq_len), generator=torch.Generator().manual_seed(7)
    )
    positions = torch.arange(seq_len).unsqueeze(0).expand(BATCH, -1)
    hf_logits = hf(input_ids=tokens).logits
    mg_logits = mg(input_ids=tokens, position_ids=positions, attention_mask=None)
    return hf, mg, hf_logits, mg_logits


def _grads(hf, mg, hf_logits, mg_logits, shape):
    weights = torch.randn(hf_logits.shape, generator=torch.Generator().manual_seed(11))
    (hf_logits * weights).sum().backward()
    (mg_logits * weights).sum().backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mapped = hf_to_megatron_state_dict(hf_grads, shape)
    mg_grads = {n: p.grad for n, p in mg.named_parameters()}
    return mapped, mg_grads


PARITY_CASES = [
    (groups, rms_norm, mem_eff_path, SEQ_LEN)
    for groups in (1, 2)
    for rms_norm in (True, False)
    for mem_eff_path in (True, False)
] + [(1, False, True, LONG_SEQ_LEN), (2, True, True, LONG_SEQ_LEN)]


@pytest.mark.parametrize("groups, rms_norm, mem_eff_path, seq_len", PARITY_CASES)
def test_logits_and_gradients_match_hf(
    single_rank_model_parallel, groups, rms_norm, mem_eff_path, seq_len
):
    shape = TinyShape(mamba_groups=groups, rms_norm=rms_norm)
    hf, mg, hf_logits, mg_logits = _run_pair(shape, MULTIPLIERS, mem_eff_path, seq_len)
    assert mg_logits.shape == hf_logits.shape
    diff = (mg_logits - hf_logits).abs().max().item()
    assert diff <= 1e-5, f"logits max abs diff {diff:.3e}"

    hf_grads, mg_grads = _grads(hf, mg, hf_logits, mg_logits, shape)
    assert set(hf_grads) == set(mg_grads)
    for name, expected in hf_grads.items():
        got = mg_grads[name]
        assert got is not None, f"no gradient for {name}"
        scale = expected.abs().max().item() + 1e-6
        err = (got - expected).abs().max().item()
        assert err <= 1e-5 * max(1.0, scale), f"{name}: grad max abs diff {err:.3e} (scale {scale:.3e})"


# The 14 numbers of the 9 multiplier fields: (field, index in a list field or None).
MULTIPLIER_SLOTS = [
    (name, None)
    for name in (
        "embedding_multiplier",
        "lm_head_multiplier",
        "key_multiplier",
        "attention_in_multiplier",
        "attention_out_multiplier",
        "ssm_in_multiplier",
        "ssm_out_multiplier",
    )
] + [("mlp_multipliers", i) for i in range(2)] + [("ssm_multipliers", i) for i in range(5)]


def _perturbed(multipliers: dict, name: str, index: int | None, factor: float = 1.5) -> dict:
    changed = {k: list(v) if isinstance(v, list) else v for k, v in multipliers.items()}
    if index is None:
        changed[name] *= factor
    else:
        changed[name][index] *= factor
    return changed


def test_multiplier_slots_cover_every_number():
    assert len(MULTIPLIER_SLOTS) == 14
    numbers = sum(len(v) if isinstance(v, list) else 1 for v in MULTIPLIERS.values())
    assert numbers == 14 and {name for name, _ in MULTIPLIER_SLOTS} == set(MULTIPLIERS)


@pytest.mark.parametrize(
    "name,index",
    MULTIPLIER_SLOTS,
    ids=[name if i is None else f"{name}[{i}]" for name, i in MULTIPLIER_SLOTS],
)
def test_multipliers_matter(single_rank_model_parallel, name, index):
    """Guard against a parity test that cannot fail: scaling any one of the 14 multipliers by 1.5
    changes HF's logits and Megatron's (so neither side ignores it, e.g. a misspelt config field
    on both sides), by far more than the parity tolerance, and Megatron still equals HF with
    the changed value (so it is applied where HF applies it)."""
    shape = TinyShape()
    _, _, hf_base, mg_base = _run_pair(shape, MULTIPLIERS)
    _, _, hf_changed, mg_changed = _run_pair(shape, _perturbed(MULTIPLIERS, name, index))
    hf_effect = (hf_changed - hf_base).abs().max().item()
    mg_effect = (mg_changed - mg_base).abs().max().item()
    parity = (mg_changed - hf_changed).abs().max().item()
    label = name if index is None else f"{name}[{index}]"
    print(f"{label}: HF moved {hf_effect:.3e}, Megatron {mg_effect:.3e}, parity {parity:.1e}")
    assert hf_effect > 1e-3, f"HF logits moved by {hf_effect:.3e}: the oracle ignores {label}"
    assert mg_effect > 1e-3, f"Megatron logits moved by {mg_effect:.3e}: {label} is ignored"
    assert parity <= 1e-5, f"with {label} changed, logits max abs diff {parity:.3e}"
