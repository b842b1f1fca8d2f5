# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""The FLOPs estimate counts a parallel hybrid ('P') layer as attention + Mamba + MLP."""

from types import SimpleNamespace

from megatron.training.training import num_floating_point_operations


class _Args(SimpleNamespace):
    """Training arguments. Those the estimate reads but this test does not set are None, as
    argparse leaves an option that was not given (upstream adds such options over time)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _args(pattern):
    return _Args(
        hybrid_layer_pattern=pattern,
        hidden_size=256,
        seq_length=128,
        num_attention_heads=8,
        group_query_attention=True,
        num_query_groups=2,
        kv_channels=64,
        ffn_hidden_size=512,
        swiglu=True,
        mamba_state_dim=64,
        mamba_head_dim=32,
        mamba_num_groups=1,
        mamba_num_heads=16,
        padded_vocab_size=1024,
        mtp_num_layers=None,
        moe_latent_size=None,
        moe_ffn_hidden_size=None,
        moe_shared_expert_intermediate_size=None,
        moe_router_topk=2,
        linear_key_head_dim=None,
        linear_value_head_dim=None,
        linear_num_key_heads=None,
        linear_num_value_heads=None,
        linear_conv_kernel_dim=None,
    )


def test_parallel_layer_flops_equal_attention_mamba_mlp():
    flops_p = num_floating_point_operations(_args("PP"), batch_size=4)
    flops_split = num_floating_point_operations(_args("*M-*M-"), batch_size=4)
    assert flops_p == flops_split
    assert flops_p > num_floating_point_operations(_args("*M*M"), batch_size=4)
