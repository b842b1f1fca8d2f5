# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""The forward multipliers of the tiny Falcon-H1 test models, written once.

All 14 are distinct and != 1, so a lost or swapped multiplier changes results. This module
imports nothing, so the HF-oracle tests outside Megatron's test tree can load it by path.
"""

MULTIPLIERS = dict(
    embedding_multiplier=1.7,
    lm_head_multiplier=0.61,
    key_multiplier=0.43,
    attention_in_multiplier=1.13,
    attention_out_multiplier=0.87,
    ssm_in_multiplier=1.29,
    ssm_out_multiplier=0.37,
    mlp_multipliers=[0.79, 1.41],
    ssm_multipliers=[0.53, 1.19, 0.71, 1.33, 0.47],
)
