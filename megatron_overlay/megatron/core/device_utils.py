# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Which device Megatron Core computes on: CUDA (the default) or the CPU.

Megatron Core assumes CUDA. This module is the one place that knows about the CPU
alternative, which exists for development and CI machines without a GPU: a run on
CPU uses gloo for communication and fp32 (or bf16) math. Call sites that used to name CUDA
directly (``torch.cuda.current_device()``, ``torch.cuda.synchronize()``, the CUDA RNG
state) ask this module instead. When the device type is ``"cuda"`` every helper
returns exactly what the CUDA call it replaces returns, so GPU behaviour is unchanged.

The device type is chosen once per process, normally by the training entry point
(``--device``), via :func:`set_device_type`. If nobody chose, it is ``"cuda"`` when a
CUDA device is present and ``"cpu"`` otherwise.
"""

import contextlib
import functools
from typing import Iterator, Optional, Union

import torch

_SUPPORTED_DEVICE_TYPES = ("cuda", "cpu")

# None means "not chosen yet": resolved lazily from torch.cuda.is_available().
_DEVICE_TYPE: Optional[str] = None


def set_device_type(device_type: str) -> None:
    """Choose the device type for this process.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
    """
    global _DEVICE_TYPE
    if device_type not in _SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"Unsupported device type {device_type!r}; expected one of {_SUPPORTED_DEVICE_TYPES}."
        )
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("Device type 'cuda' was requested but no CUDA device is available.")
    _DEVICE_TYPE = device_type


def reset_device_type() -> None:
    """Forget the chosen device type (for tests)."""
    global _DEVICE_TYPE
    _DEVICE_TYPE = None


def get_device_type() -> str:
    """Return ``"cuda"`` or ``"cpu"``: the device type this process computes on."""
    global _DEVICE_TYPE
    if _DEVICE_TYPE is None:
        _DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"
    return _DEVICE_TYPE


def using_cpu() -> bool:
    """True when this process computes on the CPU instead of CUDA."""
    return get_device_type() == "cpu"


def get_current_device() -> Union[int, torch.device]:
    """Drop-in replacement for ``torch.cuda.current_device()``.

    Returns the current CUDA device index (an ``int``, exactly what
    ``torch.cuda.current_device()`` returns) on CUDA, and ``torch.device("cpu")`` on CPU.
    Either value is accepted wherever torch takes a ``device`` argument.
    """
    if using_cpu():
        return torch.device("cpu")
    return torch.cuda.current_device()


def get_device_module():
    """``torch.cuda`` on CUDA; ``torch.cpu`` on CPU.

    ``torch.cpu`` mirrors the parts of the ``torch.cuda`` API that device-agnostic code
    uses (``Stream``, ``stream``, ``current_stream``, ``Event``, ``synchronize``) with no-op
    stand-ins, so stream and event code runs unchanged on CPU.
    """
    return torch.cpu if using_cpu() else torch.cuda


def to_current_device(tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``tensor.cuda(non_blocking=non_blocking)`` on CUDA; ``tensor.cpu()`` on CPU."""
    if using_cpu():
        return tensor.cpu()
    return tensor.cuda(non_blocking=non_blocking)


def device_tensor_type(name: str) -> str:
    """Legacy tensor type string on the compute device, as ``Tensor.type()`` returns it.

    E.g. ``device_tensor_type("FloatTensor")`` is ``"torch.cuda.FloatTensor"`` on CUDA and
    ``"torch.FloatTensor"`` on CPU.
    """
    return f"torch.{name}" if using_cpu() else f"torch.cuda.{name}"


def device_synchronize() -> None:
    """``torch.cuda.synchronize()`` on CUDA; nothing on CPU (CPU ops are synchronous)."""
    if not using_cpu():
        torch.cuda.synchronize()


def get_device_rng_state() -> torch.Tensor:
    """RNG state of the default generator of the compute device."""
    if using_cpu():
        return torch.get_rng_state()
    return torch.cuda.get_rng_state()


def set_device_rng_state(state: torch.Tensor) -> None:
    """Set the RNG state of the default generator of the compute device."""
    if using_cpu():
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)


class _CpuRNGStatesTrackerMixin:
    """Gives ``CudaRNGStatesTracker`` CPU semantics (see :func:`get_cpu_rng_tracker_class`).

    On CPU the "device" generator is torch's default CPU generator, so the tracked
    named states (data-parallel, tensor-parallel, expert-parallel ...) are CPU
    generator states and forking swaps the CPU generator.
    """

    def add(self, name: str, seed: int) -> None:
        """Track a new named RNG state seeded with ``seed`` (leaves the global state alone)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception('seed {} already exists'.format(seed))
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception('cpu rng state {} already exists'.format(name))
        self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        """Run the body with the named state in the CPU generator, then restore the old one."""
        if name not in self.states_:
            raise Exception('cpu rng state {} is not added'.format(name))
        orig_state = torch.get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f'current state name {self._current_state_name} is not the same as the '
                    f'desired state name {name}.'
                )
            self.states_[name] = torch.get_rng_state()
            if orig_state_name != "default-rng":
                orig_state = self.states_[orig_state_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_state_name


@functools.lru_cache(maxsize=None)
def get_cpu_rng_tracker_class() -> type:
    """The RNG tracker class used on CPU: ``CudaRNGStatesTracker`` with CPU generator states.

    It subclasses ``CudaRNGStatesTracker`` so that code checking
    ``isinstance(tracker, CudaRNGStatesTracker)`` (e.g. checkpointing of RNG states) treats
    it the same way. Built lazily to avoid an import cycle with ``tensor_parallel.random``.
    """
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    return type(
        "CpuRNGStatesTracker",
        (_CpuRNGStatesTrackerMixin, CudaRNGStatesTracker),
        {"__doc__": "RNG states tracker over torch's default CPU generator."},
    )
