# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""``swap_leading_dims``: the bits of ``transpose(0, 1).contiguous()``, a contiguous gradient."""

import pytest
import torch

from megatron.core.ssm import batch_first_layout
from megatron.core.ssm.batch_first_layout import swap_leading_dims


def _special(shape, dtype):
    """Random values of ``dtype`` with NaNs of distinct payloads, infinities and -0.0 mixed in:
    a copy that went through floating-point arithmetic could change these bits."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    raw = x.view(bits[dtype]).flatten()
    nan = torch.tensor(float("nan"), dtype=dtype).view(bits[dtype])
    raw[0], raw[1] = nan, nan | 1  # two NaN payloads
    flat = x.flatten()
    flat[2], flat[3], flat[4] = float("inf"), -float("inf"), -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape", [(5, 3, 16), (4, 2, 3, 8), (6, 3, 6), (7, 2, 5), (1, 4, 8)], ids=str
)
def test_swap_is_bitwise_the_transposed_copy(dtype, shape):
    x = _special(shape, dtype)
    out = swap_leading_dims(x)
    ref = x.transpose(0, 1).contiguous()
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(out.view(bits), ref.view(bits))


def test_rows_move_as_the_widest_word_that_divides_them():
    """bf16 rows of 16 elements (32 bytes) as int64; of 6 (12 bytes) as int32; of 5 (10 bytes)
    as int16 words — no wider than the element: the plain copy."""
    word = batch_first_layout._word_dtype
    assert word(torch.zeros(2, 3, 16, dtype=torch.bfloat16)) == torch.int64
    assert word(torch.zeros(2, 3, 6, dtype=torch.bfloat16)) == torch.int32
    assert word(torch.zeros(2, 3, 5, dtype=torch.bfloat16)) is None
    assert word(torch.zeros(2, 3, 6, dtype=torch.float32)) == torch.int64
    # A view starting 2 bytes into its storage cannot be read as 8-byte words.
    base = torch.zeros(2 * 3 * 16 + 4, dtype=torch.bfloat16)
    assert word(base[1:97].view(2, 3, 16)) is None
    assert word(base[4:100].view(2, 3, 16)) == torch.int64
    assert word(torch.zeros(3, 2, 16, dtype=torch.bfloat16).transpose(0, 1)) is None


def test_offset_and_strided_inputs_are_copied_correctly():
    base = torch.randn(2 * 3 * 16 + 1).to(torch.bfloat16)
    x = base[1:].view(2, 3, 16)  # 2 bytes into the storage: int16-aligned only
    assert torch.equal(swap_leading_dims(x), x.transpose(0, 1).contiguous())
    y = torch.randn(3, 2, 16).to(torch.bfloat16).transpose(0, 1)
    assert torch.equal(swap_leading_dims(y), y.transpose(0, 1).contiguous())


def test_gradient_is_swapped_back_and_contiguous():
    x = torch.randn(6, 4, 8, dtype=torch.float32, requires_grad=True)
    out = swap_leading_dims(x)
    weight = torch.randn(4, 6, 8)
    (out * weight).sum().backward()
    assert x.grad.is_contiguous()
    assert torch.equal(x.grad, weight.transpose(0, 1))


def test_gradient_meets_a_sequence_first_branch_contiguous():
    """Falcon-H1's parallel layer: one input feeds a sequence-first branch and a batch-first
    one; the summed input gradient stays in the sequence-first layout, values as with the
    plain transpose."""
    x = torch.randn(5, 3, 8, requires_grad=True)
    w1, w2 = torch.randn(5, 3, 8), torch.randn(3, 5, 8)

    ((x * w1).sum() + (swap_leading_dims(x) * w2).sum()).backward()
    grad = x.grad.clone()
    x.grad = None
    ((x * w1).sum() + (x.transpose(0, 1).contiguous() * w2).sum()).backward()
    assert grad.is_contiguous() and torch.equal(grad, x.grad)


def test_refuses_fewer_than_three_dims():
    with pytest.raises(ValueError, match="swap_leading_dims"):
        swap_leading_dims(torch.zeros(3, 4))
