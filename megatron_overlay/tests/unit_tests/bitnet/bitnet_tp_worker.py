# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
"""Worker of ``test_bitnet_layers_tp.py``: BitNet layers on a 2-rank CPU gloo world (TP=2).

Every rank builds the same FULL weight / input / output gradient, keeps its Megatron shard and
runs forward + backward through the TP=2 layer.  Rank 0 also runs the TP=1 layer (a group of
one rank) on the full tensors, gathers the shards of all ranks, assembles them into full
tensors the way Megatron lays them out, and saves both for the parent test to compare.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from pathlib import Path
from typing import Dict, List

import torch

CASES: Dict[str, dict] = {
    # column-parallel
    "col_qkv": dict(kind="column", role="linear_qkv", bias=True),
    "col_qkv_sp_skip_bias": dict(kind="column", role="linear_qkv", sp=True, skip_bias_add=True),
    "col_qkv_main_grad_nosync": dict(kind="column", role="linear_qkv", gaf=True, nosync=True),
    "col_fc1_gather": dict(kind="column", role="linear_fc1", gather_output=True),
    "col_fc1_sp": dict(kind="column", role="linear_fc1", sp=True),
    "col_fc1_sp_rms": dict(kind="column", role="linear_fc1", sp=True, rms=True),
    "col_plain_fc1_nongated": dict(kind="column", role="linear_fc1", gated=False),
    # row-parallel
    "row_proj": dict(kind="row", role="linear_proj"),
    "row_fc2_sp": dict(kind="row", role="linear_fc2", sp=True),
    "row_fc2_sp_skip_bias_nosync": dict(
        kind="row", role="linear_fc2", sp=True, skip_bias_add=True, nosync=True
    ),
    "row_scatter_input": dict(kind="row", role="linear_proj", input_is_parallel=False),
    "row_proj_rms": dict(kind="row", role="linear_proj", rms=True),
    "row_fc2_sp_rms_main_grad": dict(kind="row", role="linear_fc2", sp=True, rms=True, gaf=True),
}

SEQ, BATCH = 6, 2


def _randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@contextlib.contextmanager
def _no_host_sync():
    """Fail on .item() / .tolist() / bool(tensor) (host syncs on a GPU)."""

    def boom(*args, **kwargs):
        raise AssertionError("host sync in a BitNet layer")

    saved = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__)
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__ = boom, boom, boom
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__ = saved


def _run_layer(layer, x, dy, case, nosync):
    from megatron.core.bitnet import functional as F

    if case.get("gaf"):
        layer.weight.main_grad = torch.zeros_like(layer.weight)
    F.invalidate_weight_caches(layer)
    ctx = _no_host_sync() if nosync else contextlib.nullcontext()
    with ctx:
        y, out_bias = layer(x)
        y.backward(dy)
    wq = layer.bitnet_quantized_weight()  # cache hit: the quantisation the forward used
    rows = layer.weight.shape[0]
    res = {
        "y": y.detach(),
        "out_bias_is_bias": out_bias is not None and out_bias is layer.bias,
        "dx": x.grad,
        "dw": layer.weight.main_grad if case.get("gaf") else layer.weight.grad,
        "w_grad_is_none": layer.weight.grad is None,
        "t": wq.t,
        "beta_rows": wq.beta.expand(rows).clone() if wq.beta.dim() == 0 else wq.beta,
        "beta_is_scalar": wq.beta.dim() == 0,
        "db": None if layer.bias is None else layer.bias.grad,
        "dnorm": None if layer.rms_norm is None else layer.rms_norm.weight.grad,
    }
    return res


def _sharded_shapes(layer) -> Dict[str, tuple]:
    """Global shapes of the layer's dist-checkpointing tensors (TP sharding as declared)."""
    from megatron.core import parallel_state

    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    sharded = layer.sharded_state_dict(prefix="", metadata={"dp_cp_group": dp_cp})
    return {k: tuple(v.global_shape) for k, v in sharded.items() if hasattr(v, "global_shape")}


def _column_case(case, rank, tp, single_group, helpers, L):
    h = helpers
    role, gated = case["role"], case.get("gated", True)
    out = h.QKV_OUT if role == "linear_qkv" else (2 * h.FFN if gated else h.FFN)
    sp, gather = case.get("sp", False), case.get("gather_output", False)
    cls = functools.partial(L.BitNetColumnParallelLinear, role=role)
    seg = h.segment_ids_full(role, out, gated)
    w = _randn(out, h.HIDDEN, seed=1) * torch.tensor([0.02, 0.1, 0.5])[seg][:, None]
    b = _randn(out, seed=2, scale=0.1)
    nw = 1.0 + 0.3 * _randn(h.HIDDEN, seed=3)
    x = _randn(SEQ, BATCH, h.HIDDEN, seed=4, scale=2.0)
    dy = _randn(SEQ, BATCH, out, seed=5)
    kw = dict(
        init_method=h.init_normal,
        bias=case.get("bias", True),
        skip_bias_add=case.get("skip_bias_add", False),
    )
    common = dict(
        gated_linear_unit=gated,
        gradient_accumulation_fusion=case.get("gaf", False),
        bitnet_rms_norm=case.get("rms", False),
    )

    def build(config, w_local, b_local, **extra):
        layer = cls(h.HIDDEN, out, config=config, **kw, **extra)
        with torch.no_grad():
            layer.weight.copy_(w_local)
            if layer.bias is not None:
                layer.bias.copy_(b_local)
            if layer.rms_norm is not None:
                layer.rms_norm.weight.copy_(nw)
        return layer

    rows = [h.rank_rows(role, out, tp, r, gated) for r in range(tp)]
    cfg = h.make_config(tp=tp, sequence_parallel=sp, **common)
    layer = build(cfg, w[rows[rank]], b[rows[rank]], gather_output=gather)
    chunk = SEQ // tp
    x_local = (x[rank * chunk : (rank + 1) * chunk] if sp else x).clone().requires_grad_(True)
    all_cols = torch.cat(rows)
    dy_local = dy[..., all_cols] if gather else dy[..., rows[rank]]
    res = _run_layer(layer, x_local, dy_local, case, case.get("nosync", False))
    res["sharded_shapes"] = _sharded_shapes(layer)
    ref = None
    if rank == 0:
        cfg1 = h.make_config(tp=1, **common)
        ref_layer = build(cfg1, w, b, tp_group=single_group)
        ref = _run_layer(ref_layer, x.clone().requires_grad_(True), dy, case, False)
        ref["x_full"], ref["w_full"], ref["seg"] = x, w, seg
    return res, ref, dict(rows=rows, out=out, sp=sp, gather=gather)


def _assemble_column(results: List[dict], meta) -> dict:
    rows, out, sp, gather = meta["rows"], meta["out"], meta["sp"], meta["gather"]
    r0 = results[0]
    asm = {}
    y = torch.empty(SEQ, BATCH, out)
    if gather:
        y[..., torch.cat(rows)] = r0["y"]
        asm["y_equal_on_ranks"] = all(torch.equal(r["y"], r0["y"]) for r in results)
    else:
        for r, res in enumerate(results):
            y[..., rows[r]] = res["y"]
    asm["y"] = y
    asm["dx"] = torch.cat([r["dx"] for r in results], 0) if sp else r0["dx"]
    if not sp:
        asm["dx_equal_on_ranks"] = all(torch.equal(r["dx"], r0["dx"]) for r in results)
    for key in ("dw", "t", "beta_rows", "db"):
        if r0[key] is None:
            asm[key] = None
            continue
        full = torch.empty((out,) + tuple(r0[key].shape[1:]), dtype=r0[key].dtype)
        for r, res in enumerate(results):
            full[rows[r]] = res[key]
        asm[key] = full
    if r0["dnorm"] is not None:
        # replicated weight: with sequence parallelism finalize_model_grads sums it over TP
        asm["dnorm"] = sum(r["dnorm"] for r in results) if sp else r0["dnorm"]
    else:
        asm["dnorm"] = None
    return asm


def _row_case(case, rank, tp, single_group, helpers, L):
    h = helpers
    role = case["role"]
    in_size = h.FFN
    sp = case.get("sp", False)
    parallel_in = case.get("input_is_parallel", True)
    cls = functools.partial(L.BitNetRowParallelLinear, role=role)
    seg = h.segment_ids_full(role, h.HIDDEN)
    w = _randn(h.HIDDEN, in_size, seed=11, scale=0.05)
    b = _randn(h.HIDDEN, seed=12, scale=0.1)
    nw = 1.0 + 0.3 * _randn(in_size, seed=13)
    x = _randn(SEQ, BATCH, in_size, seed=14, scale=2.0)
    x[0, 0, : in_size // 2] *= 10.0  # a token whose absmax lies on one rank only
    dy = _randn(SEQ, BATCH, h.HIDDEN, seed=15)
    kw = dict(
        init_method=h.init_normal,
        bias=case.get("bias", True),
        skip_bias_add=case.get("skip_bias_add", False),
    )
    common = dict(
        gradient_accumulation_fusion=case.get("gaf", False), bitnet_rms_norm=case.get("rms", False)
    )

    def build(config, w_local, nw_local, input_is_parallel, **extra):
        layer = cls(
            in_size, h.HIDDEN, config=config, input_is_parallel=input_is_parallel, **kw, **extra
        )
        with torch.no_grad():
            layer.weight.copy_(w_local)
            if layer.bias is not None:
                layer.bias.copy_(b)
            if layer.rms_norm is not None:
                layer.rms_norm.weight.copy_(nw_local)
        return layer

    cols = [torch.arange(r * in_size // tp, (r + 1) * in_size // tp) for r in range(tp)]
    cfg = h.make_config(tp=tp, sequence_parallel=sp, **common)
    layer = build(cfg, w[:, cols[rank]], nw[cols[rank]], parallel_in)
    x_local = (x[..., cols[rank]] if parallel_in else x).clone().requires_grad_(True)
    chunk = SEQ // tp
    dy_local = dy[rank * chunk : (rank + 1) * chunk] if sp else dy
    res = _run_layer(layer, x_local, dy_local, case, case.get("nosync", False))
    res["sharded_shapes"] = _sharded_shapes(layer)
    ref = None
    if rank == 0:
        cfg1 = h.make_config(tp=1, **common)
        ref_layer = build(cfg1, w, nw, True, tp_group=single_group)
        ref = _run_layer(ref_layer, x.clone().requires_grad_(True), dy, case, False)
        ref["x_full"], ref["w_full"], ref["seg"] = x, w, seg
    return res, ref, dict(cols=cols, sp=sp, parallel_in=parallel_in)


def _assemble_row(results: List[dict], meta) -> dict:
    sp, parallel_in = meta["sp"], meta["parallel_in"]
    r0 = results[0]
    asm = {}
    asm["y"] = torch.cat([r["y"] for r in results], 0) if sp else r0["y"]
    if not sp:
        asm["y_equal_on_ranks"] = all(torch.equal(r["y"], r0["y"]) for r in results)
    asm["dx"] = torch.cat([r["dx"] for r in results], -1) if parallel_in else r0["dx"]
    asm["dw"] = torch.cat([r["dw"] for r in results], 1)
    asm["t"] = torch.cat([r["t"] for r in results], 1)
    asm["beta_rows"] = r0["beta_rows"]
    asm["beta_equal_on_ranks"] = all(torch.equal(r["beta_rows"], r0["beta_rows"]) for r in results)
    if r0["db"] is not None:
        # bias.sequence_parallel = True: finalize_model_grads sums its gradient over TP
        asm["db"] = sum(r["db"] for r in results) if sp else r0["db"]
    else:
        asm["db"] = None
    asm["dnorm"] = torch.cat([r["dnorm"] for r in results], 0) if r0["dnorm"] is not None else None
    return asm


def worker(rank: int, world_size: int, init_file: str, out_dir: str, names: List[str]) -> None:
    """Entry point of each spawned rank (torch.multiprocessing.spawn)."""
    # This world computes on the CPU (gloo), also on a machine with a GPU.  Megatron's gather /
    # reduce-scatter mappings allocate their outputs on torch.cuda.current_device(): point
    # that at the CPU in these worker processes.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron.core.bitnet import layers as L
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from tests.unit_tests.bitnet import bitnet_layer_helpers as helpers

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        parallel_state.destroy_model_parallel()  # state a forked rank may have inherited
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        model_parallel_cuda_manual_seed(1234)
        singles = [dist.new_group([r]) for r in range(world_size)]
        for name in names:
            case = CASES[name]
            run = _column_case if case["kind"] == "column" else _row_case
            res, ref, meta = run(case, rank, world_size, singles[rank], helpers, L)
            gathered = [None] * world_size
            dist.all_gather_object(gathered, res)
            if rank == 0:
                assemble = _assemble_column if case["kind"] == "column" else _assemble_row
                torch.save(
                    {"tp": assemble(gathered, meta), "ranks": gathered, "ref": ref, "case": case},
                    Path(out_dir) / f"{name}.pt",
                )
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
