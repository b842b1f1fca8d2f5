# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Batch-first Mamba training (``mamba_batch_first``) computes what the sequence-first layout
computes (CPU, single rank)."""

import pytest
import torch

from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
from megatron.core.ssm.mamba_mixer import MambaMixer
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.ssm.falcon_h1_test_utils import (
    MULTIPLIERS,
    tiny_hybrid_config,
    tiny_hybrid_model,
)


def _config(**overrides):
    """The shared tiny hybrid config with wider Mamba heads (head dim 16)."""
    return tiny_hybrid_config(**{"mamba_head_dim": 16, **overrides})


def _run(config, spec, pattern, tokens, state=None):
    """Logits, loss gradients by parameter name, the state dict and the shapes in_proj saw."""
    torch.manual_seed(7)
    model = tiny_hybrid_model(config, pattern, spec)
    if state is not None:
        model.load_state_dict(state)
    seen = []
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.in_proj.register_forward_hook(
                lambda _m, args, _out: seen.append(tuple(args[0].shape))
            )
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    logits = model(tokens, position_ids, attention_mask=None)
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads, model.state_dict(), seen


@pytest.mark.parametrize(
    "pattern,rms_norm",
    [("PP", False), ("PP", True), ("M*", True)],
    ids=["falcon_h1_plain_norm", "falcon_h1_gated_norm", "mamba_gated_norm"],
)
def test_batch_first_matches_sequence_first(single_rank, pattern, rms_norm):
    extra = MULTIPLIERS if pattern == "PP" else {}
    spec = falcon_h1_stack_spec if pattern == "PP" else hybrid_stack_spec_local
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(3))

    ref_logits, ref_grads, state, ref_seen = _run(
        _config(mamba_rms_norm=rms_norm, **extra), spec, pattern, tokens
    )
    logits, grads, _, seen = _run(
        _config(mamba_rms_norm=rms_norm, mamba_batch_first=True, **extra),
        spec,
        pattern,
        tokens,
        state,
    )

    # The option must change the layout in_proj sees ([s, b, h] -> [b, s, h]) ...
    assert ref_seen and all(shape[:2] == (10, 3) for shape in ref_seen)
    assert seen and all(shape[:2] == (3, 10) for shape in seen)
    # ... and nothing else. The same fp32 values meet in another order: GEMM rows are permuted
    # and weight gradients sum the tokens batch-major, so results agree to fp32 round-off
    # (a wrong transpose or a lost multiplier differs by O(1)).
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batch_first_layers_swap_layouts_with_swap_leading_dims(single_rank, monkeypatch):
    """Each batch-first Mamba layer changes layout twice per forward through
    ``swap_leading_dims`` (whole rows moved, contiguous gradients), not a strided copy."""
    from megatron.core.ssm import mamba_mixer

    calls = []
    real = mamba_mixer.swap_leading_dims
    monkeypatch.setattr(
        mamba_mixer, "swap_leading_dims", lambda x: calls.append(tuple(x.shape)) or real(x)
    )
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(3))
    _run(_config(mamba_batch_first=True, **MULTIPLIERS), falcon_h1_stack_spec, "PP", tokens)
    hidden = _config().hidden_size
    assert calls == [(10, 3, hidden), (3, 10, hidden)] * 2


def test_batch_first_micro_batch_one_is_bit_identical(single_rank):
    """With one sequence per micro-batch both layouts are the same memory: equal bits."""
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    ref_logits, ref_grads, state, _ = _run(
        _config(**MULTIPLIERS), falcon_h1_stack_spec, "PP", tokens
    )
    logits, grads, _, _ = _run(
        _config(mamba_batch_first=True, **MULTIPLIERS), falcon_h1_stack_spec, "PP", tokens, state
    )
    assert torch.equal(logits, ref_logits)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(use_mamba_mem_eff_path=False), "--disable-mamba-mem-eff-path"),
        (dict(sequence_parallel=True, tensor_model_parallel_size=2), "--sequence-parallel"),
        (dict(context_parallel_size=2), "--context-parallel-size"),
    ],
)
def test_batch_first_refuses_layouts_it_cannot_serve(kwargs, flag):
    with pytest.raises(ValueError, match="--mamba-batch-first") as error:
        _config(mamba_batch_first=True, **kwargs)
    assert flag in str(error.value)
