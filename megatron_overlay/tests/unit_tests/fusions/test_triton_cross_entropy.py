# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""``--cross-entropy-fusion-impl triton`` (megatron/core/fusions/fused_cross_entropy_triton.py).

The loss and logits gradient are checked against float64 references (``F.cross_entropy`` on the
same logits): the kernels accumulate in float32 in another order, so float32 inputs agree to a few
float32 ulps of the loss, not bit for bit. Low-precision logits must give the float64 gradient
rounded once to their dtype. On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
which ``make test`` sets); on a GPU (``gpu`` tests) compiled.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron.core.fusions import triton_support
from megatron.core.fusions.fused_cross_entropy_triton import triton_vocab_parallel_cross_entropy
from megatron.core.transformer.enums import AttnBackend
from tests.unit_tests.fusions.triton_compile import assert_compiles_for_hopper
from tests.unit_tests.gloo_ranks import forkserver_env
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)
from tests.unit_tests.gloo_single_rank import requires_cpu_training

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_support.INTERPRET,
    reason="no GPU: run with TRITON_INTERPRET=1 (Triton's CPU interpreter), as `make test` does",
)


def _reference(logits, target, grad_output):
    """float64 loss and logits gradient (targets outside the vocabulary: no predicted logit)."""
    x = logits.detach().double().requires_grad_()
    vocab = x.shape[-1]
    lse = torch.logsumexp(x, dim=-1)
    inside = (target >= 0) & (target < vocab)
    picked = x.gather(-1, target.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    loss = lse - torch.where(inside, picked, torch.zeros_like(picked))
    (grad,) = torch.autograd.grad(loss, x, grad_output.double())
    return loss, grad


def _run(logits, target, grad_output, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = triton_vocab_parallel_cross_entropy(x, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss, grad


def _case(shape, vocab, seed=0, scale=4.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    grad_output = torch.randn(*shape, generator=gen)
    return logits.to(DEVICE), target.to(DEVICE), grad_output.to(DEVICE)


# block sizes: several loop iterations with a partial last block (16, 64), one block (default)
@pytest.mark.parametrize("block_size", [16, 64, None])
@pytest.mark.parametrize("vocab", [1, 37, 200])
def test_float32_matches_float64_reference(vocab, block_size):
    logits, target, grad_output = _case((6, 2), vocab)
    loss, grad = _run(logits, target, grad_output, block_size=block_size)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert grad.dtype == torch.float32 and grad.shape == logits.shape
    # float32 accumulation (another order than the float64 reference): a few ulps of the
    # largest term, log(sum exp) ~ 8 here.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=4e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_large_logits_do_not_overflow():
    """exp of raw logits would overflow float32 (e^100); the running maximum keeps it finite."""
    logits, target, grad_output = _case((4, 2), 50)
    logits = logits + 100.0
    logits[0, 0, 3] = 400.0  # a maximum that appears only in a later block
    loss, grad = _run(logits, target, grad_output, block_size=16)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_a_once_rounded_gradient(dtype):
    logits, target, grad_output = _case((8, 2), 300, dtype=dtype)
    loss, grad = _run(logits, target, grad_output, block_size=64)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=4e-6)
    # The kernel computes each gradient in float32 and rounds it once to `dtype`: it is the
    # float64 gradient rounded, except where float32 rounding of exp moved it across a rounding
    # boundary (then one ulp of `dtype` apart).
    rounded = ref_grad.to(dtype)
    ulp = torch.finfo(dtype).eps * rounded.abs().double().clamp_min(torch.finfo(dtype).tiny)
    assert ((grad.double() - rounded.double()).abs() <= ulp).all()
    assert (grad == rounded).float().mean() > 0.99


def test_targets_outside_the_vocabulary_contribute_no_logit():
    """As vocab_parallel_cross_entropy: a target this rank does not hold adds nothing."""
    logits, target, grad_output = _case((2, 3), 20)
    target[0, 0], target[1, 2] = -1, 20
    loss, grad = _run(logits, target, grad_output, block_size=16)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=4e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)
    lse = torch.logsumexp(logits[0, 0].double(), dim=-1)
    torch.testing.assert_close(loss[0, 0].double(), lse, rtol=0, atol=4e-6)


def test_strided_logits_and_gradient_output():
    """A transposed view of the logits and a non-contiguous output gradient."""
    logits, target, grad_output = _case((3, 5), 40)
    logits_t = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [3, 5, 40], strided rows
    grad_output_t = grad_output.t().contiguous().t()
    assert not logits_t.is_contiguous() and not grad_output_t.is_contiguous()
    loss, grad = _run(logits_t, target, grad_output_t, block_size=16)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=4e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_bad_arguments_are_refused():
    logits, target, _ = _case((2, 2), 8)
    with pytest.raises(ValueError, match="must agree in every dimension"):
        triton_vocab_parallel_cross_entropy(logits, target[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        triton_vocab_parallel_cross_entropy(logits, target, block_size=24)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_support, "INTERPRET", False)
    logits, target, _ = _case((2, 2), 8)
    with pytest.raises(RuntimeError, match="--cross-entropy-fusion-impl triton needs CUDA"):
        triton_vocab_parallel_cross_entropy(logits.cpu(), target.cpu())


@requires_cpu_training
def test_vocabulary_split_over_two_ranks_equals_one_rank(tmp_path):
    """TP=2 over gloo (CPU, interpreter): per-token losses as on the whole vocabulary, each
    rank's gradient the matching columns of the whole-vocabulary gradient."""
    if not triton_support.INTERPRET:
        pytest.skip("the ranks run on CPU: needs TRITON_INTERPRET=1")
    import torch.multiprocessing as mp

    import megatron.core
    from tests.unit_tests.fusions import triton_cross_entropy_worker as worker

    roots = [str(Path(megatron.core.__file__).parents[2])]
    roots += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    preload = ["torch.distributed", "megatron.core.fusions.fused_cross_entropy_triton"]
    with forkserver_env(preload, roots):
        mp.start_processes(
            worker.worker,
            args=(2, str(tmp_path / "init"), str(tmp_path)),
            nprocs=2,
            join=True,
            start_method="forkserver",
        )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full_loss, full_grad = ranks[0]["full_loss"], ranks[0]["full_grad"]
    logits, target, grad_output = worker.inputs()
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    torch.testing.assert_close(full_loss.double(), ref_loss, rtol=0, atol=4e-6)
    shard = worker.VOCAB // 2
    for rank, result in enumerate(ranks):
        # the MAX / SUM combination of the shards: float32 rounding of the rescaled sums
        torch.testing.assert_close(result["loss"], full_loss, rtol=0, atol=4e-6)
        torch.testing.assert_close(
            result["grad"], full_grad[..., rank * shard : (rank + 1) * shard], rtol=0, atol=1e-6
        )
    # the control: a rank that ignored the other's shard would report its own log-sum-exp
    shard0_only = torch.logsumexp(logits[..., :shard].double(), dim=-1)
    assert (ranks[0]["loss"].double() - shard0_only).abs().max() > 0.1


def _falcon_h1_loss(device, fusion: bool, state=None):
    """Per-token loss and parameter gradients of a tiny Falcon-H1 model (multipliers on, so the
    loss sees lm_head-scaled logits), with or without the Triton loss; and the names of the
    autograd nodes that produced the loss; the model's state (``state``: load this one)."""
    from megatron.core.models.hybrid.falcon_h1_layer_specs import falcon_h1_stack_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from tests.unit_tests.ssm.falcon_h1_test_utils import MULTIPLIERS, tiny_hybrid_config

    config = tiny_hybrid_config(
        # local: the model sets Transformer Engine's attention variables to what the tests'
        # conftest sets where TE is installed (auto would refuse them there)
        attention_backend=AttnBackend.local,
        cross_entropy_loss_fusion=fusion,
        cross_entropy_fusion_impl="triton" if fusion else "native",
        **MULTIPLIERS,
    )
    vocab, seq, batch = 72, 8, 2
    torch.manual_seed(7)
    model = HybridModel(
        config=config,
        hybrid_stack_spec=falcon_h1_stack_spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        hybrid_layer_pattern="PP",
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    ).to(device)
    if state is not None:
        model.load_state_dict(state)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    loss = model(tokens, position_ids, None, labels=labels)
    nodes, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)
    loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, {type(n).__name__ for n in nodes}, model.state_dict()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="builds the model on the CPU ranks (interpreter), but where CUDA is present the rotary "
    "embedding's angles go to the GPU; there the compiled-kernel tests above cover the loss",
)
def test_language_model_loss_dispatches_to_the_triton_kernels(single_rank):
    """cross_entropy_loss_fusion + impl 'triton': the loss goes through the Triton function (its
    node is in the autograd graph, not in the unfused one) and equals the unfused loss, with the
    same gradients (float32 rounding: another summation order in the loss)."""
    ref_loss, ref_grads, ref_nodes, state = _falcon_h1_loss(single_rank, fusion=False)
    loss, grads, nodes, _ = _falcon_h1_loss(single_rank, fusion=True, state=state)
    assert "_TritonVocabParallelCrossEntropyBackward" in nodes
    assert "_TritonVocabParallelCrossEntropyBackward" not in ref_nodes
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=4e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cli_flag_selects_the_triton_impl(monkeypatch):
    from megatron.training.arguments import parse_args, validate_args

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "128",
            "--num-attention-heads", "4", "--max-position-embeddings", "1024",
            "--seq-length", "1024", "--micro-batch-size", "1", "--train-iters", "1",
            "--lr", "1e-4", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--transformer-impl", "local", "--cross-entropy-loss-fusion",
            "--cross-entropy-fusion-impl", "triton",
        ],
    )  # fmt: skip
    args = parse_args()
    validate_args(args)
    assert args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "triton"


_COMPILE_KERNELS = """
from megatron.core.fusions import fused_cross_entropy_triton as m

common = {"logits_row_stride": "i32", "target_ptr": "*i64", "n_cols": "i32",
          "vocab_start": "i32", "BLOCK_SIZE": "constexpr"}
for dtype in ("bf16", "fp16", "fp32"):
    fwd = {"logits_ptr": f"*{dtype}", "stats_ptr": "*fp32", "n_rows": "i32", **common}
    bwd = {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "row_max_ptr": "*fp32",
           "log_sum_exp_ptr": "*fp32", "grad_output_ptr": "*fp32", **common}
    for kernel, signature in ((m._cross_entropy_fwd_kernel, fwd), (m._cross_entropy_bwd_kernel, bwd)):
        compile_for_hopper(kernel, signature, {"BLOCK_SIZE": 4096}, num_warps=8)
"""


def test_kernels_compile_for_hopper():
    """Both kernels compile to sm_90 machine code for every logits dtype (no GPU needed)."""
    assert_compiles_for_hopper(_COMPILE_KERNELS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_falcon_h1_shape_matches_the_unfused_loss():
    """Compiled kernels at the Falcon-H1-0.5B loss shape (8192 tokens x 32784 vocabulary, bf16)
    against the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2048, 4, 32784, device="cuda", generator=gen).mul_(3).bfloat16()
    target = torch.randint(0, 32784, (2048, 4), device="cuda", generator=gen)
    grad_output = torch.rand(2048, 4, device="cuda", generator=gen)
    loss, grad = _run(logits, target, grad_output)
    ref_loss, ref_grad = _reference(logits, target, grad_output)
    # GPU exp is approximate (ex2.approx, ~2 ulp): a few float32 ulps of log-sum-exp (~13)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=2e-5)
    rounded = ref_grad.bfloat16()
    ulp = torch.finfo(torch.bfloat16).eps * rounded.abs().double().clamp_min(1e-30)
    assert ((grad.double() - rounded.double()).abs() <= ulp).all()
