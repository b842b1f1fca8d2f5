# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Tests of ``megatron.core.ssm.mamba_keep_activations`` (``--mamba-keep-ssd-activations``):
mamba_ssm's Mamba-2 training kernels without the backward's recomputation, bit for bit.

On the CPU, ``mamba_keep_worker.py`` runs mamba_ssm's Triton kernels in Triton's interpreter in a
subprocess (mamba_ssm's package needs a placeholder for its Mamba-1 CUDA extension, which must
not leak into this process's other tests). mamba_ssm's Python sources (no CUDA build needed) come from the directory
``$MAMBA_SSM_PYTHONPATH`` or from an importable ``mamba_ssm``. The ``gpu`` tests run the CUDA kernels, causal_conv1d included.
"""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron.core
from megatron.core.ssm import mamba_keep_activations as keep
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.gloo_single_rank import single_rank  # noqa: F401 (fixture)

TREE = Path(megatron.core.__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("mamba_keep_worker.py")
MAMBA_SSM_PATH_ENV = "MAMBA_SSM_PYTHONPATH"


def _mamba_ssm_path():
    """Directory to put on the worker's PYTHONPATH for mamba_ssm ('' when importable here)."""
    path = os.environ.get(MAMBA_SSM_PATH_ENV)
    if path:
        if not (Path(path) / "mamba_ssm").is_dir():
            pytest.fail(f"${MAMBA_SSM_PATH_ENV}={path} holds no mamba_ssm package")
        return path
    if importlib.util.find_spec("mamba_ssm") is not None:
        return ""
    pytest.skip(f"needs mamba_ssm's Python sources (set ${MAMBA_SSM_PATH_ENV})")


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """Outputs and gradients of both implementations for every case of the worker."""
    tmp = tmp_path_factory.mktemp("mamba_keep")
    (tmp / "selective_scan_cuda.py").write_text("")  # the Mamba-1 extension, unused here
    inherited = os.environ.get("PYTHONPATH", "")
    paths = [p for p in (_mamba_ssm_path(), str(tmp), str(TREE), inherited) if p]
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        MAMBA_DETERMINISTIC="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(paths),
    )
    out = tmp / "results.pt"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


# The worker's cases (its CASES, through the scan and through the split-convolution function).
CASES = [
    "scan/two_groups",
    "scan/one_group_D_per_channel",
    "scan/packed_sequences",
    "split/two_groups",
    "split/one_group_D_per_channel",
    "split/packed_sequences",
]


def test_worker_ran_every_case(worker_results):
    assert sorted(k for k in worker_results if "/" in k) == sorted(CASES)


def test_mamba_ssm_wrappers_take_what_the_module_passes(worker_results):
    """The installed mamba_ssm's kernel wrappers (checked in the worker, where they import)."""
    assert worker_results["missing_keywords"] == []


@pytest.mark.parametrize("case", CASES)
def test_same_output_and_gradients_as_mamba_ssm(worker_results, case):
    """Every output and input gradient equals mamba_ssm's, bit for bit (same kernels, same
    inputs); the gradients are finite and not all zero (a backward that returned nothing would
    not pass)."""
    ours, theirs = worker_results[case]["keep"], worker_results[case]["mamba_ssm"]
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert value is not None and theirs[name] is not None, name
        assert value.dtype == theirs[name].dtype and value.shape == theirs[name].shape, name
        assert torch.equal(
            value, theirs[name]
        ), f"{case} {name}: max difference {(value.float() - theirs[name].float()).abs().max()}"
        assert torch.isfinite(value).all(), name
        assert value.abs().sum() > 0, name


def test_entry_point_names_what_is_missing():
    """Without the kernels the function refuses with the flag's name and the reason."""
    problems = keep.kernel_interface_problems()
    if not problems:
        pytest.skip("mamba_ssm and causal_conv1d import here")
    zxbcdt = torch.zeros(1, 8, 2 * 16 + 2 * 8 + 2)
    with pytest.raises(RuntimeError, match="--mamba-keep-ssd-activations") as error:
        keep.mamba_split_conv1d_scan_keep(
            zxbcdt,
            torch.zeros(32, 4),
            None,
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            4,
            headdim=8,
        )
    assert problems[0] in str(error.value)


def test_interface_check_reports_a_missing_keyword():
    """A mamba_ssm whose kernel wrapper lost a keyword argument this module passes is named;
    wrappers taking every keyword pass."""

    def taking(*names):
        def wrapper(*args, **kwargs):
            return None

        wrapper.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
        )
        return wrapper

    # pylint: disable=protected-access
    complete = {name: taking(*keywords) for name, keywords in keep._KEYWORDS.items()}
    assert keep.missing_keywords(complete) == []
    complete["_chunk_state_fwd"] = taking("seq_idx")
    assert keep.missing_keywords(complete) == [
        "mamba_ssm's _chunk_state_fwd takes no states_in_fp32"
    ]


def _config(**kwargs):
    return TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True, **kwargs
    )


def test_flag_defaults_off():
    assert _config().mamba_keep_ssd_activations is False


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(use_mamba_mem_eff_path=False), "--disable-mamba-mem-eff-path"),
        (
            dict(
                bf16=True,
                params_dtype=torch.bfloat16,
                mamba_training_ssm_states_dtype=torch.float32,
            ),
            "--mamba-training-ssm-states-dtype",
        ),
    ],
)
def test_flag_refuses_what_it_cannot_serve(kwargs, named):
    with pytest.raises(ValueError, match="--mamba-keep-ssd-activations") as error:
        _config(mamba_keep_ssd_activations=True, **kwargs)
    assert named in str(error.value)


def _cuda_kernels_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    problems = keep.kernel_interface_problems()
    if problems:
        pytest.skip("; ".join(problems))


@pytest.fixture
def deterministic_mamba():
    """mamba_ssm's deterministic reductions (no atomics), so that two runs compare bitwise."""
    from mamba_ssm.utils import determinism

    determinism.set_deterministic_mode(True)
    yield
    determinism.set_deterministic_mode(None)


def assert_same_as_reference(ours, reference, repeat):
    """``ours`` equals ``reference`` bit for bit wherever the reference repeats itself bit for
    bit (``repeat``: the reference run again). Elsewhere (reductions by atomic adds, e.g.
    causal_conv1d's weight gradient or attention's backward) the kernels' summation order
    changes between runs, so ours may differ from the reference by as much as the reference
    from itself, no more."""
    assert ours.keys() == reference.keys() == repeat.keys()
    for name, value in ours.items():
        ref, again = reference[name].float(), repeat[name].float()
        assert value.dtype == reference[name].dtype and value.shape == ref.shape, name
        assert value.abs().sum() > 0, name
        spread = (ref - again).abs().max().item()
        difference = (value.float() - ref).abs().max().item()
        if spread == 0:
            assert difference == 0, f"{name}: {difference} from a reference that repeats exactly"
        else:
            assert difference <= spread, f"{name}: {difference} > the reference's own {spread}"


@pytest.mark.gpu
@pytest.mark.parametrize("ngroups, D_per_channel", [(1, False), (2, True)])
def test_cuda_kernels_match_mamba_split_conv1d_scan_combined(
    deterministic_mamba, ngroups, D_per_channel
):
    """With the real kernels (causal_conv1d included) at a Falcon-H1-like shape: output and
    every gradient equal mamba_ssm's function (see ``assert_same_as_reference``)."""
    _cuda_kernels_or_skip()
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, l, heads, headdim, state, chunk = 2, 512, 8, 64, 128, 128
    d_inner = heads * headdim
    conv = d_inner + 2 * ngroups * state

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

    inputs = dict(
        zxbcdt=randn(b, l, 2 * d_inner + 2 * ngroups * state + heads),
        conv1d_weight=randn(conv, 4, scale=0.5),
        conv1d_bias=randn(conv, scale=0.1),
        dt_bias=randn(heads, scale=0.5, dtype=torch.float32),
        A=-torch.rand(heads, device="cuda", generator=gen) - 0.5,
        D=(
            randn(heads, headdim, dtype=torch.float32)
            if D_per_channel
            else randn(heads, dtype=torch.float32)
        ),
    )
    dout = randn(b, l, d_inner)
    headdim_arg = None if D_per_channel else headdim

    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = fn(
            leaves["zxbcdt"],
            leaves["conv1d_weight"],
            leaves["conv1d_bias"],
            leaves["dt_bias"],
            leaves["A"],
            leaves["D"],
            chunk,
            activation="silu",
            headdim=headdim_arg,
            ngroups=ngroups,
        )
        out.backward(dout)
        return {"out": out.detach(), **{k: v.grad for k, v in leaves.items()}}

    reference = run(mamba_split_conv1d_scan_combined)
    ours = run(keep.mamba_split_conv1d_scan_keep)
    assert_same_as_reference(ours, reference, run(mamba_split_conv1d_scan_combined))


def _mamba_model_run(config, tokens, state=None):
    """Logits and parameter gradients of a two-layer Mamba model on the GPU, and its state."""
    from megatron.core.models.hybrid.hybrid_backend_specs import hybrid_stack_spec_local
    from tests.unit_tests.ssm.falcon_h1_test_utils import tiny_hybrid_model

    torch.manual_seed(7)
    model = tiny_hybrid_model(config, "MM", hybrid_stack_spec_local, position_embedding_type="none")
    if state is not None:
        model.load_state_dict(state)
    model = model.cuda()
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device="cuda").unsqueeze(0).expand(batch, seq)
    logits = model(tokens, position_ids, attention_mask=None)
    logits.float().pow(2).mean().backward()
    result = {"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    return result, state


@pytest.mark.gpu
def test_mixer_with_the_flag_trains_the_same_bits(single_rank, deterministic_mamba, monkeypatch):
    """MambaMixer layers on the GPU (a two-layer Mamba model; attention-free, so the comparison
    is exact wherever the default path repeats itself): with --mamba-keep-ssd-activations every
    layer calls the keeping function once per forward, and logits and parameter gradients equal
    the default path's (see ``assert_same_as_reference``)."""
    _cuda_kernels_or_skip()
    from megatron.core.ssm import mamba_mixer
    from tests.unit_tests.ssm.falcon_h1_test_utils import tiny_hybrid_config

    calls = []
    real = mamba_mixer.mamba_split_conv1d_scan_keep
    monkeypatch.setattr(
        mamba_mixer,
        "mamba_split_conv1d_scan_keep",
        lambda *args, **kwargs: calls.append(args[0].shape) or real(*args, **kwargs),
    )
    sizes = dict(mamba_head_dim=16, mamba_state_dim=16, mamba_chunk_size=16)
    tokens = torch.randint(0, 64, (2, 48), device="cuda")
    reference, state = _mamba_model_run(tiny_hybrid_config(**sizes), tokens)
    repeat, _ = _mamba_model_run(tiny_hybrid_config(**sizes), tokens, state)
    assert not calls
    ours, _ = _mamba_model_run(
        tiny_hybrid_config(mamba_keep_ssd_activations=True, **sizes), tokens, state
    )
    assert len(calls) == 2  # one per Mamba layer, one forward
    assert_same_as_reference(ours, reference, repeat)
