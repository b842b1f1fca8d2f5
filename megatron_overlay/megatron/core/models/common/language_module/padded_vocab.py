# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Masking the logits of the padded vocabulary rows (``--unpadded-vocab-size``).

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` x TP, so the output
layer has rows no token id uses. Their logits still enter the softmax: a checkpoint converted
from a model without padding (zero rows, logit 0) then computes a different loss than the
original, and a trained model can put probability on ids that do not exist. With
``config.unpadded_vocab_size`` set, ``LanguageModule._scale_logits`` (every logits path: plain,
MTP, inference) replaces those logits by the lowest finite value of their dtype: ``exp`` of it,
after the softmax subtracts the row maximum, is exactly 0, so they add nothing to the softmax
sum, the loss or its gradient. A finite value rather than ``-inf`` keeps products such as
``probability * log_probability`` (entropies) finite: 0, not NaN.
"""

from __future__ import annotations

import torch

from megatron.core.utils import get_pg_rank, get_pg_size


def mask_padded_vocab_logits(
    logits: torch.Tensor, unpadded_vocab_size: int, padded_vocab_size: int, tp_group
) -> torch.Tensor:
    """``logits`` with the entries of token ids >= ``unpadded_vocab_size`` set to the dtype's
    lowest finite value (out of place, so autograd gives them zero gradient).

    Args:
        logits: ``[..., padded_vocab_size]`` (gathered) or ``[..., padded_vocab_size / TP]``
            (vocabulary-parallel: TP rank ``r`` holds ids ``r * width ... (r + 1) * width - 1``).
        unpadded_vocab_size: number of real vocabulary entries.
        padded_vocab_size: rows of the model's output layer (all TP ranks together).
        tp_group: the tensor-parallel group the vocabulary is split over.
    """
    if unpadded_vocab_size > padded_vocab_size:
        raise ValueError(
            f"--unpadded-vocab-size {unpadded_vocab_size} is larger than the model's (padded) "
            f"vocabulary of {padded_vocab_size}"
        )
    width = logits.size(-1)
    tp_size = get_pg_size(tp_group)
    if width == padded_vocab_size:
        start = 0
    elif width * tp_size == padded_vocab_size:
        start = get_pg_rank(tp_group) * width
    else:
        raise ValueError(
            f"logits have {width} vocabulary entries, neither the padded vocabulary "
            f"({padded_vocab_size}) nor its share of one of {tp_size} tensor-parallel ranks"
        )
    first_padded = unpadded_vocab_size - start
    if first_padded >= width:
        return logits
    padded = torch.arange(width, device=logits.device) >= max(first_padded, 0)
    return logits.masked_fill(padded, torch.finfo(logits.dtype).min)
