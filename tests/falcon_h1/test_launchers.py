"""Falcon-H1 launchers: presets, flags from an HF config, and a real (tiny) CPU launch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from falcon_h1.oracle import MULTIPLIERS, TinyShape, hf_config

ROOT = Path(__file__).resolve().parents[2]
ARGS = ROOT / "scripts" / "falcon_h1" / "falcon_h1_args.py"


def _flags(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ARGS), *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_readme_launch_line_uses_the_0_5b_preset():
    """The README's copy-paste 0.5B command carries exactly the preset's model flags."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\ntorchrun --nproc-per-node 8 build/Megatron-LM/pretrain_mamba.py(.*?)```", readme, re.S)
    assert block, "README lost its Falcon-H1-0.5B launch line"
    words = block.group(1).replace("\\\n", " ").split()
    preset = _flags("--preset", "0.5b")
    i = 0
    while i < len(preset):  # every preset flag (with its values) appears in the README line
        flag = preset[i]
        j = i + 1
        while j < len(preset) and not preset[j].startswith("--"):
            j += 1
        at = words.index(flag)
        assert words[at : at + (j - i)] == preset[i:j], (flag, words[at : at + (j - i)])
        i = j


def test_unverified_preset_requires_the_release_config():
    out = subprocess.run([sys.executable, str(ARGS), "--preset", "7b"], capture_output=True, text=True)
    assert out.returncode != 0 and "--hf-config" in out.stderr


def test_flags_from_hf_config(tmp_path):
    shape = TinyShape(mamba_groups=2, rms_norm=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(shape, MULTIPLIERS).to_dict()))
    flags = _flags("--hf-config", str(path))
    text = " ".join(flags)
    assert "--hybrid-layer-pattern PP " in text
    assert "--kv-channels 24" in text and "--mamba-num-groups 2" in text
    assert "--no-mamba-rms-norm" not in text
    assert "--ssm-multipliers 0.53 1.19 0.71 1.33 0.47" in text
    assert "--key-multiplier 0.43" in text and "--rotary-base 100000000000" in text


def _args_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("falcon_h1_args", ARGS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.megatron
def test_every_preset_accepts_more_tp_ranks_than_mamba_groups(megatron_tree):
    """Every preset (released models have 1 or 2 Mamba groups and 2 or 4 KV heads) takes every
    TP size of 1, 2, 4, 8 that divides its attention heads, Mamba heads and FFN width: the
    groups and KV heads never limit TP. A size that does not divide the heads is refused."""
    module = _args_module()
    for name, row in module.PRESETS.items():
        _, _, heads, kv, _, m_heads, _, d_state, groups, ffn, _, _ = row
        shape = (heads, kv, m_heads, groups, d_state, ffn)
        accepted = [tp for tp in (1, 2, 4, 8) if not module.parallel_problems(*shape, tp, 1)]
        divides = [tp for tp in (1, 2, 4, 8)
                   if heads % tp == 0 and m_heads % tp == 0 and (ffn or tp) % tp == 0]
        assert accepted == divides, (name, accepted, divides)
        assert max(accepted) > groups, (name, accepted)
        bad = module.parallel_problems(*shape, 3, 1)
        assert bad and all("--tensor-model-parallel-size 3" in p for p in bad), (name, bad)
    # The 0.5B at TP=4 x CP=2 (4 ranks on one Mamba group, 2 on each KV head).
    assert "--mamba-num-groups" in _flags("--preset", "0.5b", "--tp", "4", "--cp", "2")
    out = subprocess.run([sys.executable, str(ARGS), "--preset", "0.5b", "--tp", "16"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "allowed tensor-parallel sizes" in out.stderr, out.stderr
    # 24 Mamba heads / TP 8 = 3 per rank: CP=2 cannot split them.
    out = subprocess.run([sys.executable, str(ARGS), "--preset", "0.5b", "--tp", "8", "--cp", "2"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and "--context-parallel-size 2 must divide" in out.stderr


@pytest.mark.megatron
def test_train_script_runs_a_tiny_model_on_cpu(tmp_path, megatron_tree):
    """The launcher at TP=2 with sequence parallelism: two ranks share the one Mamba group."""
    shape = TinyShape(mamba_groups=1, rms_norm=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(shape, MULTIPLIERS).to_dict()))
    env = dict(os.environ)
    env.update(
        HF_CONFIG=str(path), NPROC="2", TP="2", SP="1", SEQ_LEN="32", MBS="2", GBS="2", TRAIN_ITERS="3",
        WARMUP="1", PYTHON=sys.executable, MEGATRON=str(megatron_tree), CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1", MASTER_PORT="29611",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "falcon_h1" / "train_falcon_h1.sh"), "--device", "cpu",
         "--eval-iters", "0", "--log-interval", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(r"tensor_model_parallel_size \.+ 2\b", output), output[-3000:]
    assert re.search(r"sequence_parallel \.+ True\b", output), output[-3000:]
    assert len(re.findall(r"iteration\s+\d+/\s*3 \|.*lm loss", output)) == 3, output[-3000:]


@pytest.mark.parametrize("value", ["1", "yes"])
def test_optimizer_graph_refused_where_it_cannot_run(value, tmp_path):
    """OPTIMIZER_GRAPH=1 without a GPU (no full-iteration graph) and a bad value both stop the
    launcher before torchrun with a message naming the variable."""
    env = dict(os.environ, OPTIMIZER_GRAPH=value, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "falcon_h1" / "train_falcon_h1.sh")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "OPTIMIZER_GRAPH" in proc.stderr


def _launch_args(tmp_path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Run the launcher (extra flags ``args``) with a stand-in ``torchrun`` that prints the
    arguments it gets."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    env.update(env_vars)
    env["PATH"] = os.pathsep.join([str(fake.parent), env["PATH"]])
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "falcon_h1" / "train_falcon_h1.sh"), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "env_vars,expected",
    [({}, True), ({"SP": "1", "TP": "2"}, False), ({"CP": "2"}, False), ({"BATCH_FIRST": "0"}, False),
     ({"BATCH_FIRST": "1"}, True)],
    ids=["auto", "auto_sp", "auto_cp", "off", "on"],
)  # fmt: skip
def test_batch_first_follows_the_parallel_layout(tmp_path, env_vars, expected):
    proc = _launch_args(tmp_path, **env_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("--mamba-batch-first" in proc.stdout.splitlines()) == expected, proc.stdout


@pytest.mark.parametrize("env_vars", [{"BATCH_FIRST": "1", "SP": "1", "TP": "2"}, {"BATCH_FIRST": "yes"}])
def test_batch_first_refused_where_it_cannot_run(tmp_path, env_vars):
    proc = _launch_args(tmp_path, **env_vars)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "BATCH_FIRST" in proc.stderr


def _python_with_transformer_engine(tmp_path) -> str:
    """A ``PYTHON`` for the launcher that answers its ``import transformer_engine.pytorch``
    probe with success and runs everything else with this interpreter (a fake TE package on
    ``PYTHONPATH`` would also fool Megatron's own imports in ``falcon_h1_args.py``)."""
    shim = tmp_path / "python_with_te"
    shim.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -c ] && [ "$2" = "import transformer_engine.pytorch" ]; then exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    shim.chmod(0o755)
    return str(shim)


@pytest.mark.parametrize(
    "env_vars,expected",
    [({"NPROC": "1"}, True), ({"NPROC": "2", "TP": "2"}, True), ({"NPROC": "8"}, False),
     ({"NPROC": "1", "NNODES": "2"}, False), ({"NPROC": "1", "CUDA_GRAPHS": "none"}, False),
     ({"NPROC": "1", "OPTIMIZER_GRAPH": "0"}, False), ({"NPROC": "8", "OPTIMIZER_GRAPH": "1"}, True),
     ({"NPROC": "1", "CUDA_GRAPHS": "local"}, True)],
    ids=["auto_one_rank", "auto_tp2", "auto_dp8", "auto_two_nodes", "auto_no_graphs", "off", "on_dp8",
         "auto_per_layer_graphs"],
)  # fmt: skip
def test_optimizer_graph_auto_with_one_data_parallel_rank(tmp_path, env_vars, expected):
    """auto captures the optimizer step only where it was measured: a whole-iteration graph,
    Transformer Engine, one data-parallel rank. ``CUDA_GRAPHS=full_iteration`` stands in for a
    GPU (the launcher keeps an explicit setting)."""
    env_vars = {"CUDA_GRAPHS": "full_iteration", "PYTHON": _python_with_transformer_engine(tmp_path),
                **env_vars}  # fmt: skip
    proc = _launch_args(tmp_path, **env_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = proc.stdout.splitlines()
    assert ("--optimizer-cuda-graph" in args) == expected, proc.stdout
    graphed = env_vars["CUDA_GRAPHS"] != "none"
    assert ("--cuda-graph-impl" in args) == graphed
    if graphed:
        assert args[args.index("--cuda-graph-impl") + 1] == env_vars["CUDA_GRAPHS"]
    # The graph comes with the rerun state machine off (nothing to validate without the NaN check).
    assert (" --rerun-mode disabled" in " " + " ".join(args)) == graphed, proc.stdout


def test_optimizer_graph_auto_needs_transformer_engine(tmp_path):
    """Without Transformer Engine (the local spec), auto leaves the optimizer step eager."""
    proc = _launch_args(tmp_path, NPROC="1", CUDA_GRAPHS="full_iteration", IMPL="local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = proc.stdout.splitlines()
    assert "--cuda-graph-impl" in args and "--optimizer-cuda-graph" not in args, proc.stdout


def test_optimizer_graph_on_request_without_transformer_engine(tmp_path):
    """OPTIMIZER_GRAPH=1 captures the optimizer step with the local spec too (without TE or
    Apex the captured gradient clipping stays on the device: patch 0045)."""
    proc = _launch_args(
        tmp_path, NPROC="1", CUDA_GRAPHS="full_iteration", IMPL="local", OPTIMIZER_GRAPH="1"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = proc.stdout.splitlines()
    assert "--cuda-graph-impl" in args and "--optimizer-cuda-graph" in args, proc.stdout
    assert args[args.index("--transformer-impl") + 1] == "local", proc.stdout


@pytest.mark.parametrize(
    "extra,expected", [([], True), (["--reset-attention-mask"], False)], ids=["default", "reset"]
)
def test_dataloader_mask_only_for_document_masks(tmp_path, extra, expected):
    """The launcher drops the data loader's causal mask (host time; it keeps the local spec's
    attention off its flash kernel) unless the user asks for document-wise masks."""
    proc = _launch_args(tmp_path, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = proc.stdout.splitlines()
    assert ("--no-create-attention-mask-in-dataloader" in args) == expected, proc.stdout


def _python_with_a_gpu(tmp_path) -> str:
    """A ``PYTHON`` for the launcher that answers its CUDA probe with "available"."""
    shim = tmp_path / "python_with_gpu"
    shim.write_text(
        "#!/bin/sh\n"
        'case "$2" in *torch.cuda.is_available*) exit 0 ;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    shim.chmod(0o755)
    return str(shim)


def _launch_args_on(tmp_path, gpu: bool, env_vars: dict) -> list[str]:
    """The launcher's pretrain arguments (one per line) on a machine with or without a GPU."""
    if gpu:
        env_vars = {"PYTHON": _python_with_a_gpu(tmp_path), **env_vars}
    proc = _launch_args(tmp_path, **env_vars)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize(
    "gpu,env_vars,expected",
    [(True, {}, True), (False, {}, False), (True, {"TORCH_FUSED_ADAM": "0"}, False),
     (False, {"TORCH_FUSED_ADAM": "1"}, True)],
    ids=["auto_gpu", "auto_cpu", "off", "on_cpu"],
)  # fmt: skip
def test_torch_fused_adam_on_gpus_by_default(tmp_path, gpu, env_vars, expected):
    args = _launch_args_on(tmp_path, gpu, env_vars)
    assert ("--use-torch-fused-adam" in args) == expected, args
    assert ("--cuda-graph-impl" in args) == gpu  # the same probe decides the graphs


@pytest.mark.parametrize(
    "gpu,env_vars,expected",
    [(True, {}, True), (False, {}, False), (True, {"CROSS_ENTROPY": "unfused"}, False),
     (False, {"CROSS_ENTROPY": "triton"}, True)],
    ids=["auto_gpu", "auto_cpu", "unfused", "triton_cpu"],
)  # fmt: skip
def test_triton_cross_entropy_on_gpus_by_default(tmp_path, gpu, env_vars, expected):
    args = _launch_args_on(tmp_path, gpu, env_vars)
    fused = "--cross-entropy-loss-fusion" in args
    assert fused == expected, args
    if fused:
        assert args[args.index("--cross-entropy-fusion-impl") + 1] == "triton"
    else:
        assert "--cross-entropy-fusion-impl" not in args


def test_cross_entropy_setting_is_checked(tmp_path):
    proc = _launch_args(tmp_path, CROSS_ENTROPY="fused")
    assert proc.returncode == 2 and "CROSS_ENTROPY" in proc.stderr


def test_torch_fused_adam_setting_is_checked(tmp_path):
    proc = _launch_args(tmp_path, TORCH_FUSED_ADAM="yes")
    assert proc.returncode == 2 and "TORCH_FUSED_ADAM" in proc.stderr


def test_cuda_graphs_setting_is_checked(tmp_path):
    proc = _launch_args(tmp_path, CUDA_GRAPHS="per_layer")
    assert proc.returncode == 2 and "CUDA_GRAPHS must be full_iteration, local or none" in proc.stderr


@pytest.mark.parametrize(
    "gpu,te,expected",
    [(True, False, False), (False, False, True), (True, True, False)],
    ids=["gpu_no_te", "cpu_no_te", "gpu_te"],
)
def test_local_spec_fuses_rope_where_a_kernel_runs(tmp_path, gpu, te, expected):
    """The local spec passes --no-rope-fusion only where no fused RoPE can run: without Transformer
    Engine and without a GPU (patch 0039's Triton kernel needs CUDA). This interpreter has
    Triton (a dependency of the CPU test environment)."""
    if te:
        te_python = _python_with_transformer_engine(tmp_path)
        shim = tmp_path / "python_with_gpu_and_te"
        shim.write_text(
            "#!/bin/sh\n"
            'case "$2" in *torch.cuda.is_available*) exit 0 ;; esac\n'
            f'exec "{te_python}" "$@"\n'
        )
        shim.chmod(0o755)
        env_vars = {"PYTHON": str(shim), "IMPL": "local", "OPTIMIZER_GRAPH": "0"}
        proc = _launch_args(tmp_path, **env_vars)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        args = proc.stdout.splitlines()
    else:
        args = _launch_args_on(tmp_path, gpu, {"IMPL": "local"})
    assert args[args.index("--transformer-impl") + 1] == "local"
    assert ("--no-rope-fusion" in args) == expected, args
