# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Tests of the CPU device support (megatron.core.device_utils, megatron.training.cpu_support).

They need no GPU and no torch.distributed: they run on CPU-only CI machines.
"""

from argparse import Namespace

import pytest
import torch

from megatron.core import device_utils
from megatron.core.device_utils import (
    device_synchronize,
    device_tensor_type,
    get_cpu_rng_tracker_class,
    get_current_device,
    get_device_module,
    get_device_rng_state,
    get_device_type,
    set_device_rng_state,
    set_device_type,
    to_current_device,
    using_cpu,
)
from megatron.core.tensor_parallel import random as tp_random
from megatron.training.cpu_support import (
    cpu_dataloader_kwargs,
    cpu_memory_report,
    resolve_device,
    validate_device_args,
)


@pytest.fixture
def cpu_device():
    """Select the CPU device type for one test and restore the unset state afterwards."""
    set_device_type("cpu")
    yield
    device_utils.reset_device_type()


class TestDeviceUtils:

    def test_default_follows_cuda_availability(self):
        device_utils.reset_device_type()
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert get_device_type() == expected
        device_utils.reset_device_type()

    def test_rejects_unknown_device_type(self):
        with pytest.raises(ValueError, match="xpu"):
            set_device_type("xpu")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_request_without_cuda_fails(self):
        with pytest.raises(RuntimeError, match="no CUDA device"):
            set_device_type("cuda")

    def test_cpu_helpers(self, cpu_device):
        assert using_cpu()
        assert get_current_device() == torch.device("cpu")
        assert get_device_module() is torch.cpu
        assert device_tensor_type("FloatTensor") == "torch.FloatTensor"
        assert torch.zeros(2, device=get_current_device()).type() == device_tensor_type(
            "FloatTensor"
        )
        device_synchronize()  # a no-op on CPU; must not initialise CUDA
        tensor = torch.arange(3)
        assert to_current_device(tensor, non_blocking=True).device.type == "cpu"

    def test_device_rng_state_is_cpu_generator_on_cpu(self, cpu_device):
        state = get_device_rng_state()
        first = torch.rand(4)
        set_device_rng_state(state)
        assert torch.equal(torch.rand(4), first)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_helpers_match_torch_cuda(self):
        set_device_type("cuda")
        try:
            assert get_current_device() == torch.cuda.current_device()
            assert get_device_module() is torch.cuda
            assert device_tensor_type("FloatTensor") == "torch.cuda.FloatTensor"
        finally:
            device_utils.reset_device_type()


class TestCpuRNGTracker:

    def _tracker(self):
        tp_random.initialize_rng_tracker(force_reset=True)
        tracker = tp_random.get_cuda_rng_tracker()
        return tracker

    def test_tracker_class_on_cpu(self, cpu_device):
        tracker = self._tracker()
        assert isinstance(tracker, tp_random.CudaRNGStatesTracker)
        assert type(tracker) is get_cpu_rng_tracker_class()
        tp_random.initialize_rng_tracker(force_reset=True)

    def test_fork_draws_from_named_stream_and_restores_default(self, cpu_device):
        tracker = self._tracker()
        torch.manual_seed(1)
        tracker.add("a", 123)
        tracker.add("b", 456)

        expected_a = torch.Generator().manual_seed(123)
        expected_b = torch.Generator().manual_seed(456)
        default_before = torch.get_rng_state()

        with tracker.fork("a"):
            a1 = torch.rand(3)
        with tracker.fork("b"):
            b1 = torch.rand(3)
        with tracker.fork("a"):  # continues stream "a" where it stopped
            a2 = torch.rand(3)

        assert torch.equal(a1, torch.rand(3, generator=expected_a))
        assert torch.equal(b1, torch.rand(3, generator=expected_b))
        assert torch.equal(a2, torch.rand(3, generator=expected_a))
        # The default stream was not consumed by the forked regions.
        assert torch.equal(torch.get_rng_state(), default_before)
        tp_random.initialize_rng_tracker(force_reset=True)

    def test_states_round_trip(self, cpu_device):
        tracker = self._tracker()
        tracker.add("a", 7)
        states = {k: v.clone() for k, v in tracker.get_states().items()}
        with tracker.fork("a"):
            first = torch.rand(5)
        tracker.set_states(states)
        with tracker.fork("a"):
            assert torch.equal(torch.rand(5), first)
        tp_random.initialize_rng_tracker(force_reset=True)

    def test_duplicate_seed_rejected(self, cpu_device):
        tracker = self._tracker()
        tracker.add("a", 7)
        with pytest.raises(Exception, match="seed 7 already exists"):
            tracker.add("b", 7)
        tp_random.initialize_rng_tracker(force_reset=True)


def _training_args(**overrides):
    args = dict(
        rank=0,
        device="cpu",
        distributed_backend="nccl",
        transformer_impl="local",
        fp16=False,
        bf16=False,
        fp8=None,
        fp4=None,
        cuda_graph_impl="none",
        tp_comm_overlap=False,
        use_megatron_fsdp=False,
        use_torch_fsdp2=False,
        te_rng_tracker=False,
        nccl_ub=False,
        use_sharp=False,
        cross_entropy_loss_fusion=False,
        cross_entropy_fusion_impl="native",
        gradient_accumulation_fusion=True,
        masked_softmax_fusion=True,
        apply_rope_fusion=True,
        bias_gelu_fusion=True,
        bias_swiglu_fusion=True,
        bias_dropout_fusion=True,
        no_persist_layer_norm=False,
        use_cpu_initialization=False,
        seed=1234,
    )
    args.update(overrides)
    return Namespace(**args)


class TestValidateDeviceArgs:

    def teardown_method(self):
        device_utils.reset_device_type()

    def test_cpu_run_is_made_cpu_compatible(self, capsys):
        args = _training_args()
        validate_device_args(args)
        assert using_cpu()
        assert args.distributed_backend == "gloo"
        assert args.use_cpu_initialization
        for name in (
            "gradient_accumulation_fusion",
            "masked_softmax_fusion",
            "apply_rope_fusion",
            "bias_gelu_fusion",
            "bias_swiglu_fusion",
            "bias_dropout_fusion",
        ):
            assert getattr(args, name) is False, name
        assert args.no_persist_layer_norm
        out = capsys.readouterr().out
        assert "--no-gradient-accumulation-fusion" in out
        assert "training on device: cpu" in out

    @pytest.mark.parametrize(
        "overrides, named",
        [
            ({"transformer_impl": "transformer_engine"}, "--transformer-impl transformer_engine"),
            ({"fp16": True}, "--fp16"),
            ({"fp8": "hybrid"}, "--fp8-format"),
            ({"cuda_graph_impl": "local"}, "--cuda-graph-impl"),
            ({"tp_comm_overlap": True}, "--tp-comm-overlap"),
        ],
    )
    def test_cuda_only_options_are_named(self, overrides, named):
        with pytest.raises(ValueError, match=named):
            validate_device_args(_training_args(**overrides))

    def test_bf16_allowed(self):
        args = _training_args(bf16=True)
        validate_device_args(args)
        assert args.bf16

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_auto_selects_cpu_without_cuda(self):
        assert resolve_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="--device cuda"):
            resolve_device("cuda")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_run_untouched(self):
        args = _training_args(device="auto")
        before = dict(vars(args))
        validate_device_args(args)
        after = dict(vars(args))
        assert after.pop("device") == "cuda"
        before.pop("device")
        assert after == before


class TestCpuTrainingHelpers:

    def teardown_method(self):
        device_utils.reset_device_type()

    def test_dataloader_gets_own_generator_on_cpu(self):
        set_device_type("cpu")
        kwargs = cpu_dataloader_kwargs(Namespace(seed=5))
        before = torch.get_rng_state()
        loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, **kwargs)
        list(iter(loader))
        assert torch.equal(torch.get_rng_state(), before)

    def test_memory_report(self):
        report = cpu_memory_report()
        assert "resident" in report and "max resident" in report
