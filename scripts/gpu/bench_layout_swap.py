#!/usr/bin/env python3
"""The batch-first Mamba layer's layout changes, fwd+bwd: the plain transposed copy vs
``swap_leading_dims`` (megatron/core/ssm/batch_first_layout.py), at Falcon-H1's shapes; and the
per-channel multiplier fold into a weight: PyTorch's broadcasting multiply vs the Triton row
scale (megatron/core/fusions/fused_row_scale_triton.py), and the backward hook's gradient
accumulation into float32 main_grad: main_grad.add_ vs the Triton kernel
(megatron/core/fusions/fused_grad_accumulation.py), and the fold's backward adding into main_grad
in the same pass, at the 0.5B model's weights (GPU, or Triton's interpreter with
``--fold-on-cpu``; these replays rerun the accumulation, so only the first result is compared,
from a fresh start).

Why: in the 0.5B step's trace (TE spec, both graphs, batch-first) each parallel layer spent
about 100 us on layout: two strided copies forward (the normed input to ``[b, s, h]``, the
Mamba output back), and backward a strided copy of the output's gradient, a strided permuted
sum of the two branches' input gradients and a copy of that sum. This times, for one layer,

- ``transpose``: ``x.transpose(0, 1).contiguous()`` both ways (the code before);
- ``swap``: ``swap_leading_dims`` both ways (rows moved as 8-byte words; contiguous gradients),

each as graph replays of: input to batch-first, output back to sequence-first plus the other
branch's output, backward with the other branch's input gradient summed in, gradients made
contiguous as their consumers (RMSNorm backward, out_proj's backward GEMM) need them. Results
of both must be bit-identical (checked). CUDA events, median of ``--iters`` after ``--warmup``.
Writes ``bench_layout_swap.json`` with the provenance of scripts/lib/provenance.py.

    python3 scripts/gpu/bench_layout_swap.py --out-dir OUT [--shapes 0.5b_s2048_b4,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "lib"))
from cuda_timing import graphed, median_ms  # noqa: E402
from provenance import provenance  # noqa: E402

SHAPES = {  # name: (sequence, micro-batch, hidden) of bench_falcon_h1.py's cases
    "0.5b_s2048_b4": (2048, 4, 1024),
    "0.5b_s4096_b2": (4096, 2, 1024),
    "1.5b-deep_s4096_b1": (4096, 1, 1280),
    "tiny": (8, 3, 16),  # for the CPU test of this script
}
CASES = ("transpose", "swap")


def layout_function(case: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[a, b, *] -> [b, a, *]`` contiguous, as ``case`` does it."""
    if case == "swap":
        from megatron.core.ssm.batch_first_layout import swap_leading_dims

        return swap_leading_dims
    return lambda t: t.transpose(0, 1).contiguous()


def layer_layout_step(case: str, tensors: dict) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One parallel layer's layout work, fwd+bwd; returns (batch-first input, branch sum,
    input gradient, Mamba output gradient)."""
    to_other = layout_function(case)
    x, y = tensors["x"], tensors["y"]

    def step():
        u = to_other(x)  # the normed input as in_proj reads it: [b, s, h]
        branch_sum = to_other(y) + tensors["attention_out"]  # [s, b, h]
        # x.view_as(x): the attention branch's use of x, whose gradient adds to the Mamba one.
        gx, gy = torch.autograd.grad(
            [u, branch_sum, x.view_as(x)],
            [x, y],
            [tensors["grad_u"], tensors["grad_sum"], tensors["grad_attention_in"]],
        )
        return u, branch_sum, gx.contiguous(), gy.contiguous()

    return step


def make_tensors(seq: int, batch: int, hidden: int, device: str, dtype: torch.dtype) -> dict:
    """The layer's input ``x`` [s, b, h], Mamba output ``y`` [b, s, h] and the gradients."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return {
        "x": rand(seq, batch, hidden).requires_grad_(),
        "y": rand(batch, seq, hidden).requires_grad_(),
        "attention_out": rand(seq, batch, hidden),
        "grad_u": rand(batch, seq, hidden),
        "grad_sum": rand(seq, batch, hidden),
        "grad_attention_in": rand(seq, batch, hidden),
    }


def measure(shape: str, device: str, warmup: int, iters: int) -> dict:
    """Per case: microseconds per replay (GPU) and bit-equality with ``transpose``."""
    seq, batch, hidden = SHAPES[shape]
    tensors = make_tensors(seq, batch, hidden, device, torch.bfloat16)
    out: dict = {"seq": seq, "batch": batch, "hidden": hidden, "cases": {}}
    reference = None
    for case in CASES:
        step = layer_layout_step(case, tensors)
        if device == "cuda":
            replay, static = graphed(step)
            replay()
            torch.cuda.synchronize()
            result = {"us_per_layer": 1e3 * median_ms(replay, warmup, iters)}
        else:
            static, result = step(), {}
        values = [t.detach().clone() for t in static]
        if reference is None:
            reference = values
        result["bit_identical_to_transpose"] = all(
            torch.equal(a.view(torch.int16), b.view(torch.int16))
            for a, b in zip(values, reference)
        )
        out["cases"][case] = result
    return out


# Per-channel-scaled weights of the 0.5B model (rows x columns): linear_qkv (key multiplier),
# mamba_in_proj (segment multipliers), linear_fc1 (gate multiplier).
FOLD_WEIGHTS = {"linear_qkv": (1536, 1024), "mamba_in_proj": (3352, 1024), "linear_fc1": (4096, 1024)}
FOLD_TINY = {"tiny": (6, 40)}  # for the CPU test of this script (Triton's interpreter)


def measure_fold(rows: int, cols: int, device: str, warmup: int, iters: int) -> dict:
    """``weight * scale[:, None]`` fwd+bwd as PyTorch's broadcasting multiply (``torch``) and
    the Triton row scale (``triton``, megatron/core/fusions/fused_row_scale_triton.py)."""
    from megatron.core.fusions.fused_row_scale_triton import row_scaled

    gen = torch.Generator(device=device).manual_seed(1)
    weight = torch.randn(rows, cols, generator=gen, device=device).bfloat16().requires_grad_()
    scale = (torch.rand(rows, generator=gen, device=device) + 0.5).bfloat16()
    grad = torch.randn(rows, cols, generator=gen, device=device).bfloat16()
    fold = {"torch": lambda w: w * scale.unsqueeze(1), "triton": lambda w: row_scaled(w, scale)}
    out: dict = {}
    reference = None
    for name, function in fold.items():

        def step(function=function):
            scaled = function(weight)
            (grad_weight,) = torch.autograd.grad(scaled, weight, grad)
            return scaled, grad_weight

        if device == "cuda":
            replay, static = graphed(step)
            result = {"us": 1e3 * median_ms(replay, warmup, iters)}
        else:
            static, result = step(), {}
        values = [t.detach().clone() for t in static]
        reference = reference or values
        result["bit_identical_to_torch"] = all(
            torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(values, reference)
        )
        out[name] = result
    return out


def measure_accumulate(rows: int, cols: int, device: str, warmup: int, iters: int) -> dict:
    """``main_grad += grad`` (float32 += bf16) as ``main_grad.add_`` (``torch``) and the Triton
    kernel of the backward hook (``triton``, megatron/core/fusions/fused_grad_accumulation.py)."""
    from megatron.core.fusions.fused_grad_accumulation import triton_accumulate_

    gen = torch.Generator(device=device).manual_seed(2)
    start = torch.randn(rows * cols, generator=gen, device=device)
    grad = torch.randn(rows * cols, generator=gen, device=device).bfloat16()
    add = {"torch": lambda m: m.add_(grad), "triton": lambda m: triton_accumulate_(m, grad)}
    out: dict = {}
    reference = None
    for name, function in add.items():
        main = start.clone()
        if device == "cuda":
            replay, _ = graphed(lambda main=main, function=function: function(main))
            result = {"us": 1e3 * median_ms(replay, warmup, iters)}
        else:
            result = {}
        main.copy_(start)
        function(main)  # once from the same start: the bits to compare
        reference = main if reference is None else reference
        result["bit_identical_to_torch"] = torch.equal(main.view(torch.int32), reference.view(torch.int32))
        out[name] = result
    return out


def measure_fold_accumulate(rows: int, cols: int, device: str, warmup: int, iters: int) -> dict:
    """The fold fwd+bwd with the weight gradient added into a float32 ``main_grad``: PyTorch
    (broadcasting multiply, then ``main_grad.add_``: ``torch``), two Triton passes (the row
    scale, then the backward hook's accumulation kernel: ``two_passes``) and one (the fold's
    backward adds into the parameter's ``main_grad``: ``one_pass``). Replays rerun the
    accumulation, so the bits compared come from one run from the same start."""
    from megatron.core.fusions.fused_grad_accumulation import triton_accumulate_
    from megatron.core.fusions.fused_row_scale_triton import row_scaled

    gen = torch.Generator(device=device).manual_seed(3)
    weight = torch.randn(rows, cols, generator=gen, device=device).bfloat16()
    scale = (torch.rand(rows, generator=gen, device=device) + 0.5).bfloat16()
    grad = torch.randn(rows, cols, generator=gen, device=device).bfloat16()
    start = torch.randn(rows, cols, generator=gen, device=device)
    out: dict = {}
    reference = None
    for name in ("torch", "two_passes", "one_pass"):
        param = torch.nn.Parameter(weight.clone())
        main = start.clone()
        if name == "one_pass":  # as the data-parallel wrapper leaves a parameter
            param.main_grad, param.grad_added_to_main_grad = main, False

        def step(name=name, param=param, main=main):
            if name == "torch":
                scaled = param * scale.unsqueeze(1)
            else:
                scaled = row_scaled(param, scale)
            (grad_weight,) = torch.autograd.grad(scaled, param, grad)
            if name == "torch":
                main.add_(grad_weight)
            elif name == "two_passes":
                triton_accumulate_(main, grad_weight)
            return scaled

        if device == "cuda":
            replay, _ = graphed(step)
            result = {"us": 1e3 * median_ms(replay, warmup, iters)}
        else:
            result = {}
        main.copy_(start)
        scaled = step().detach().clone()
        if name == "one_pass":
            result["added_in_backward"] = bool(param.grad_added_to_main_grad)
        values = (scaled, main)
        reference = reference or values
        result["bit_identical_to_torch"] = torch.equal(
            scaled.view(torch.int16), reference[0].view(torch.int16)
        ) and torch.equal(main.view(torch.int32), reference[1].view(torch.int32))
        out[name] = result
    return out


FOLD_SECTIONS = {
    "fold": measure_fold,
    "accumulate": measure_accumulate,
    "fold_accumulate": measure_fold_accumulate,
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shapes", default="0.5b_s2048_b4,0.5b_s4096_b2,1.5b-deep_s4096_b1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--fold-on-cpu", action="store_true", help="also the fold cases on CPU (TRITON_INTERPRET=1)"
    )
    parser.add_argument(
        "--fold-weights",
        default=",".join(FOLD_WEIGHTS),
        help=f"weights of the fold cases, from {sorted(FOLD_WEIGHTS | FOLD_TINY)}",
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {**provenance(sys.argv), "dtype": "torch.bfloat16", "device_kind": device}
    report["shapes"] = {
        s: measure(s, device, args.warmup, args.iters) for s in args.shapes.split(",")
    }
    weights = {n: (FOLD_WEIGHTS | FOLD_TINY)[n] for n in args.fold_weights.split(",")}
    if device == "cuda" or args.fold_on_cpu:  # the kernel needs CUDA (or Triton's interpreter)
        for section, function in FOLD_SECTIONS.items():
            report[section] = {
                name: function(*shape, device, args.warmup, args.iters)
                for name, shape in weights.items()
            }
    exact = all(
        c["bit_identical_to_transpose"] for r in report["shapes"].values() for c in r["cases"].values()
    ) and all(
        c["bit_identical_to_torch"]
        for section in FOLD_SECTIONS
        for r in report.get(section, {}).values()
        for c in r.values()
    )
    report["summary"] = {"passed": int(exact), "failed": int(not exact)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_layout_swap.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, r in report["shapes"].items():
        print(name, json.dumps(r["cases"]))
    for section in FOLD_SECTIONS:
        for name, r in report.get(section, {}).items():
            print(section, name, json.dumps(r))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
