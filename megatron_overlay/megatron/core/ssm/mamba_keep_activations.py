# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""Mamba-2 training that keeps its activations for the backward (``--mamba-keep-ssd-activations``).

``mamba_ssm``'s memory-efficient training function (``mamba_split_conv1d_scan_combined``, which
``MambaMixer`` calls) keeps only its input for the backward and recomputes there the causal
convolution, the chunked cumulative sums of ``dt * A``, the chunk states and their passing
across chunks, and ``C^T B`` per chunk. In a profiled Falcon-H1-0.5B training step on an H200
(36 Mamba layers, 4 x 2048 tokens, CUDA graphs) these recomputations took 3.24 ms per step.

:func:`mamba_split_conv1d_scan_keep` runs the same ``mamba_ssm`` / ``causal_conv1d`` kernels in
the same order, keeps those tensors from the forward instead and returns the same output and
gradients, bit for bit: every kernel gets the values it gets in ``mamba_ssm``'s backward. The
backward needs the passed states in float32 while the forward's chunk scan reads them in the
input dtype, so the forward runs the state-passing kernel twice (once per output dtype; the
kernel accumulates in float32 either way). What the forward keeps per layer, beyond ``mamba_ssm``'s
input and scan output: the convolution output (``b * l * (d_inner + 2 * groups * state)`` in the
input dtype), the float32 passed states (``b * chunks * heads * headdim * state``), ``C^T B``
(``b * chunks * groups * chunk_size^2``, float32) and two float32 ``b * heads * chunks *
chunk_size`` tensors.

Scope: what ``MambaMixer`` trains with. No output projection or gated RMSNorm inside the
function (the mixer applies its own), no non-SSM channels, no initial or final states. The
kernels run on CUDA tensors only; :func:`mamba_chunk_scan_keep` (the scan without the
convolution) also runs in Triton's interpreter, which is how the CPU tests compare it with
``mamba_ssm``'s ``mamba_chunk_scan_combined``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from einops import rearrange

try:
    from mamba_ssm.ops.triton.ssd_bmm import _bmm_chunk_bwd, _bmm_chunk_fwd
    from mamba_ssm.ops.triton.ssd_chunk_scan import (
        _chunk_scan_bwd_dC,
        _chunk_scan_bwd_dcb,
        _chunk_scan_bwd_ddAcs_stable,
        _chunk_scan_bwd_dstates,
        _chunk_scan_bwd_dz,
        _chunk_scan_fwd,
    )
    from mamba_ssm.ops.triton.ssd_chunk_state import (
        _chunk_cumsum_bwd,
        _chunk_cumsum_fwd,
        _chunk_state_bwd_db,
        _chunk_state_fwd,
    )
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd

    HAVE_MAMBA_SSM_KERNELS = True
except ImportError:
    HAVE_MAMBA_SSM_KERNELS = False

try:
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

    HAVE_CAUSAL_CONV1D_KERNELS = True
except ImportError:
    causal_conv1d_fwd_function = causal_conv1d_bwd_function = None
    HAVE_CAUSAL_CONV1D_KERNELS = False

NO_DT_LIMIT = (0.0, float("inf"))

# The mamba_ssm kernel wrappers this module calls and the keyword arguments it passes them
# (checked by kernel_interface_problems(): the wrappers are private to mamba_ssm).
_KEYWORDS = {
    "_chunk_cumsum_fwd": ("dt_bias", "dt_softplus", "dt_limit"),
    "_chunk_state_fwd": ("seq_idx", "states_in_fp32"),
    "_state_passing_fwd": ("seq_idx", "chunk_size", "out_dtype"),
    "_bmm_chunk_fwd": ("seq_idx", "output_dtype"),
    "_chunk_scan_fwd": ("D", "z", "seq_idx"),
    "_chunk_scan_bwd_dz": ("chunk_size", "has_ddAcs", "D", "dz"),
    "_chunk_scan_bwd_dstates": ("seq_idx", "dtype"),
    "_state_passing_bwd": (
        "seq_idx",
        "has_initial_states",
        "dstates_dtype",
        "states_dtype",
        "chunk_size",
    ),
    "_chunk_scan_chunk_state_bwd_dx": ("D", "seq_idx", "dx"),
    "_chunk_state_bwd_db": ("seq_idx", "B", "ngroups"),
    "_chunk_scan_bwd_dC": ("seq_idx", "C", "ngroups"),
    "_chunk_scan_bwd_dcb": ("seq_idx", "ngroups"),
    "_bmm_chunk_bwd": ("residual", "out"),
    "_chunk_scan_bwd_ddAcs_stable": (),
    "_chunk_cumsum_bwd": ("dt_bias", "dt_softplus", "dt_limit", "ddt"),
}


def missing_keywords(wrappers: dict) -> list:
    """Problems of the kernel wrappers ``wrappers`` (name -> function, the names of
    ``_KEYWORDS``): each one without a keyword argument this module passes it."""
    problems = []
    for name, keywords in _KEYWORDS.items():
        parameters = inspect.signature(wrappers[name]).parameters
        missing = [k for k in keywords if k not in parameters]
        if missing:
            problems.append(f"mamba_ssm's {name} takes no {', '.join(missing)}")
    return problems


@functools.lru_cache(maxsize=None)
def kernel_interface_problems() -> tuple:
    """What keeps this module from running: missing kernels, or mamba_ssm kernel wrappers
    without a keyword argument this module passes (empty when it can run). Checked once per
    process (it inspects signatures; the training step calls it every forward)."""
    if not HAVE_MAMBA_SSM_KERNELS:
        return ("mamba_ssm's Triton kernels do not import",)
    problems = missing_keywords({name: globals()[name] for name in _KEYWORDS})
    if not HAVE_CAUSAL_CONV1D_KERNELS:
        problems.append("causal_conv1d's kernels (causal_conv1d.cpp_functions) do not import")
    return tuple(problems)


@dataclass
class _KeptScan:
    """What the chunked scan's forward keeps for its backward (all float32)."""

    dt: torch.Tensor  # dt after dt_bias, softplus and limits, (b, heads, chunks, chunk_size)
    dA_cumsum: torch.Tensor  # cumulative dt * A within each chunk, same shape
    states: torch.Tensor  # state entering each chunk, (b, chunks, heads, headdim * state)
    CB: torch.Tensor  # C^T B within each chunk, (b, chunks, groups, chunk_size, chunk_size)

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """In the order :meth:`from_tensors` takes them (for ``save_for_backward``)."""
        return (self.dt, self.dA_cumsum, self.states, self.CB)

    @classmethod
    def from_tensors(cls, tensors) -> "_KeptScan":
        """Inverse of :meth:`tensors`."""
        return cls(*tensors)


def _kernel_layout(x, B, C, z, D):
    """The layouts the scan kernels accept (values unchanged): the last dimension of B, C and D
    contiguous, of x and z the last or the sequence dimension."""
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    if x.stride(-1) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    if z is not None and z.stride(-1) != 1 and z.stride(1) != 1:
        z = z.contiguous()
    if D is not None and D.stride(-1) != 1:
        D = D.contiguous()
    return x, B, C, z, D


def _scan_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx, dt_limit):
    """Chunked scan forward: ``(out, out_x, kept)``, ``out`` gated by ``silu(z)`` when ``z`` is
    given (``out_x`` ungated), ``kept`` what the backward reuses."""
    dstate = B.shape[-1]
    dA_cumsum, dt_out = _chunk_cumsum_fwd(
        dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit
    )
    chunk_states = _chunk_state_fwd(B, x, dt_out, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
    chunk_states = rearrange(chunk_states, "... p n -> ... (p n)")
    decay = dA_cumsum[:, :, :, -1]
    # Same recurrence twice: float32 for the backward, the input dtype for the chunk scan.
    states, _ = _state_passing_fwd(chunk_states, decay, seq_idx=seq_idx, chunk_size=chunk_size)
    scan_states, _ = _state_passing_fwd(
        chunk_states, decay, seq_idx=seq_idx, chunk_size=chunk_size, out_dtype=C.dtype
    )
    CB = _bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    scan_states = rearrange(scan_states, "... (p n) -> ... p n", n=dstate)
    out, out_x = _chunk_scan_fwd(
        CB, x, dt_out, dA_cumsum, C, scan_states, D=D, z=z, seq_idx=seq_idx
    )
    return out, out_x, _KeptScan(dt=dt_out, dA_cumsum=dA_cumsum, states=states, CB=CB)


def _scan_backward(
    dout, x, dt, A, B, C, z, out, D, dt_bias, seq_idx, dt_limit, chunk_size, kept, given=None
):
    """Gradients of the chunked scan: ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias)``.

    ``out`` is the forward's ungated output (``out_x``) when ``z`` is given, else its output.
    ``given`` optionally names tensors to write ``dx`` / ``ddt`` / ``dB`` / ``dC`` / ``dz`` into
    (views of one buffer in the split-convolution function)."""
    given = given or {}
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    ngroups, dstate = B.shape[-2], B.shape[-1]
    dB = given.get("dB")
    dB = torch.empty_like(B) if dB is None else dB
    dC = given.get("dC")
    dC = torch.empty_like(C) if dC is None else dC
    ddt = given.get("ddt")
    ddt = torch.empty_like(dt) if ddt is None else ddt
    dz = None
    dD = None
    if z is not None:
        # Gate and skip connection first: dout becomes the gradient of the ungated output.
        dz, dout, dD, *_ = _chunk_scan_bwd_dz(
            x, z, out, dout, chunk_size=chunk_size, has_ddAcs=False, D=D, dz=given.get("dz")
        )
    dstates = _chunk_scan_bwd_dstates(
        C, kept.dA_cumsum, dout, seq_idx=seq_idx, dtype=kept.states.dtype
    )
    dstates, ddA_chunk_end, _, states = _state_passing_bwd(
        kept.states,
        kept.dA_cumsum[:, :, :, -1],
        rearrange(dstates, "... p n -> ... (p n)"),
        seq_idx=seq_idx,
        has_initial_states=False,
        dstates_dtype=x.dtype,
        states_dtype=x.dtype,
        chunk_size=chunk_size,
    )
    states = rearrange(states, "... (p n) -> ... p n", n=dstate)
    dstates = rearrange(dstates, "... (p n) -> ... p n", n=dstate)
    dx, ddt_scan, dD_from_x = _chunk_scan_chunk_state_bwd_dx(
        x,
        kept.dt,
        kept.dA_cumsum,
        B,
        kept.CB,
        dout,
        dstates,
        D=D,
        seq_idx=seq_idx,
        dx=given.get("dx"),
    )
    dB_states, ddA_next = _chunk_state_bwd_db(
        x, kept.dt, kept.dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=ngroups
    )
    dC_states, ddA_cumsum_prev = _chunk_scan_bwd_dC(
        states, kept.dA_cumsum, dout, seq_idx=seq_idx, C=C, ngroups=ngroups
    )
    dCB = _chunk_scan_bwd_dcb(x, kept.dt, kept.dA_cumsum, dout, seq_idx=seq_idx, ngroups=ngroups)
    dCB = dCB.to(kept.CB.dtype)
    _bmm_chunk_bwd(C, dCB, residual=dB_states, out=dB)
    _bmm_chunk_bwd(B, rearrange(dCB, "... l s -> ... s l"), residual=dC_states, out=dC)
    if z is None:
        dD = dD_from_x
    # Gradient of the within-chunk cumulative sums: the terms through later chunks' states
    # (reverse cumulative sum), through this chunk's state, and within the chunk.
    ddA_cumsum_prev[..., -1] += ddA_chunk_end
    ddA_prev = ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    ddA = _chunk_scan_bwd_ddAcs_stable(x, kept.dt, kept.dA_cumsum, dout, kept.CB)
    ddA += ddA_next + ddA_prev
    ddt, dA, ddt_bias = _chunk_cumsum_bwd(
        ddA, ddt_scan, dt, A, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, ddt=ddt
    )
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias


class _ChunkScanKeepFn(torch.autograd.Function):
    """The chunked scan (no convolution), keeping its activations; see the module docstring."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx, dt_limit):
        # pylint: disable=missing-function-docstring,arguments-differ
        x, B, C, z, D = _kernel_layout(x, B, C, z, D)
        out, out_x, kept = _scan_forward(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx, dt_limit
        )
        ctx.save_for_backward(
            out if z is None else out_x, x, dt, A, B, C, D, z, dt_bias, seq_idx, *kept.tensors()
        )
        ctx.chunk_size = chunk_size
        ctx.dt_limit = dt_limit
        return out

    @staticmethod
    def backward(ctx, dout):
        # pylint: disable=missing-function-docstring,arguments-differ
        out, x, dt, A, B, C, D, z, dt_bias, seq_idx, *kept = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias = _scan_backward(
            dout,
            x,
            dt,
            A,
            B,
            C,
            z,
            out,
            D,
            dt_bias,
            seq_idx,
            ctx.dt_limit,
            ctx.chunk_size,
            _KeptScan.from_tensors(kept),
        )
        return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, None, None


def mamba_chunk_scan_keep(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    dt_limit: Tuple[float, float] = NO_DT_LIMIT,
) -> torch.Tensor:
    """``mamba_ssm``'s ``mamba_chunk_scan_combined(..., dt_softplus=True)`` keeping its
    activations for the backward (no initial or final states).

    Args:
        x: ``(b, l, heads, headdim)``.
        dt: ``(b, l, heads)``, before ``dt_bias`` and softplus.
        A: ``(heads,)``.
        B, C: ``(b, l, groups, state)``.
        chunk_size: tokens per chunk.
        D: skip connection, ``(heads, headdim)`` or ``(heads,)``.
        z: gate, shape of ``x``: the output is multiplied by ``silu(z)``.
        dt_bias: ``(heads,)``.
        seq_idx: ``(b, l)`` int32 sequence index of every token (packed sequences).
        dt_limit: clamp of ``dt`` after softplus.

    Returns:
        ``(b, l, heads, headdim)``.
    """
    return _ChunkScanKeepFn.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, seq_idx, dt_limit)


def _channels_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``(b, l, channels)``) with its sequence stride a multiple of 8, as causal_conv1d's
    channels-last kernels need (a contiguous copy otherwise)."""
    if t.shape[2] % 8 != 0:
        raise ValueError(f"causal_conv1d needs a multiple of 8 channels, got {t.shape[2]}")
    return t if t.stride(1) % 8 == 0 else t.contiguous()


def _conv_channels_last(t: torch.Tensor) -> torch.Tensor:
    return rearrange(_channels_stride(t), "b s d -> b d s")


@dataclass
class _Layout:
    """Channel layout of ``zxbcdt`` = ``[z | x | B | C | dt]``."""

    heads: int
    headdim: int
    groups: int
    state: int

    @property
    def d_inner(self) -> int:
        """Channels of x (and z)."""
        return self.heads * self.headdim

    @property
    def conv_channels(self) -> int:
        """Channels of ``[x | B | C]``, the convolution's input and output."""
        return self.d_inner + 2 * self.groups * self.state

    def split(self, zxbcdt: torch.Tensor):
        """``(z, xBC, dt)`` views of ``zxbcdt`` (or of its gradient)."""
        return torch.split(zxbcdt, [self.d_inner, self.conv_channels, self.heads], dim=-1)

    def split_conv(self, xBC: torch.Tensor):
        """``(x, B, C)`` views of the convolution's output (or its gradient), shaped for the
        scan kernels."""
        x, B, C = torch.split(
            xBC, [self.d_inner, self.groups * self.state, self.groups * self.state], dim=-1
        )
        return (
            rearrange(x, "b l (h p) -> b l h p", h=self.heads),
            rearrange(B, "b l (g n) -> b l g n", g=self.groups),
            rearrange(C, "b l (g n) -> b l g n", g=self.groups),
        )

    def heads_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(b, l, d_inner)`` as ``(b, l, heads, headdim)``."""
        return rearrange(t, "b l (h p) -> b l h p", h=self.heads)


def _layout(zxbcdt, conv1d_weight, D, headdim, ngroups) -> _Layout:
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is needed when D has one value per head")
        heads = D.shape[0]
    else:
        heads, headdim = D.shape
    d_inner = heads * headdim
    if heads % ngroups != 0:
        raise ValueError(f"{heads} heads do not split into {ngroups} groups")
    state = (conv1d_weight.shape[0] - d_inner) // ngroups // 2
    layout = _Layout(heads=heads, headdim=headdim, groups=ngroups, state=state)
    expected = 2 * d_inner + 2 * ngroups * state + heads
    if zxbcdt.shape[-1] != expected:
        raise ValueError(
            f"zxbcdt has {zxbcdt.shape[-1]} channels; [z | x | B | C | dt] of this layer has "
            f"{expected} (non-SSM channels are not supported here)"
        )
    return layout


class _SplitConv1dScanKeepFn(torch.autograd.Function):
    """Causal convolution + chunked scan from the in_proj output, keeping the activations."""

    @staticmethod
    def forward(
        ctx,
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        seq_idx,
        dt_limit,
        activation,
        headdim,
        ngroups,
    ):
        # pylint: disable=missing-function-docstring,arguments-differ
        layout = _layout(zxbcdt, conv1d_weight, D, headdim, ngroups)
        silu = activation in ("silu", "swish")
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        z, xBC, dt = layout.split(zxbcdt)
        xBC_conv = causal_conv1d_fwd_function(
            _conv_channels_last(xBC), conv1d_weight, conv1d_bias, seq_idx, None, None, silu
        )
        xBC_conv = rearrange(xBC_conv, "b d s -> b s d")
        x, B, C = layout.split_conv(xBC_conv)
        z = layout.heads_view(z)
        x, B, C, z, D_scan = _kernel_layout(x, B, C, z, D)
        out, out_x, kept = _scan_forward(
            x, dt, A, B, C, chunk_size, D_scan, z, dt_bias, seq_idx, dt_limit
        )
        ctx.save_for_backward(
            zxbcdt,
            conv1d_weight,
            conv1d_bias,
            xBC_conv,
            out_x,
            A,
            D,
            dt_bias,
            seq_idx,
            *kept.tensors(),
        )
        ctx.layout = layout
        ctx.silu = silu
        ctx.chunk_size = chunk_size
        ctx.dt_limit = dt_limit
        return rearrange(out, "b s h p -> b s (h p)")

    @staticmethod
    def backward(ctx, dout):
        # pylint: disable=missing-function-docstring,arguments-differ
        zxbcdt, conv1d_weight, conv1d_bias, xBC_conv, out_x, A, D, dt_bias, seq_idx, *kept = (
            ctx.saved_tensors
        )
        layout = ctx.layout
        z, xBC, dt = layout.split(zxbcdt)
        x, B, C = layout.split_conv(xBC_conv)
        z = layout.heads_view(z)
        x, B, C, z, D_scan = _kernel_layout(x, B, C, z, D)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxBC_given, ddt_given = layout.split(dzxbcdt)
        dxBC = torch.empty_like(xBC)
        dx, dB, dC = layout.split_conv(dxBC)
        dout = rearrange(dout, "b s (h p) -> b s h p", p=layout.headdim)
        _, _, dA, _, _, dD, _, ddt_bias = _scan_backward(
            dout,
            x,
            dt,
            A,
            B,
            C,
            z,
            out_x,
            D_scan,
            dt_bias,
            seq_idx,
            ctx.dt_limit,
            ctx.chunk_size,
            _KeptScan.from_tensors(kept),
            given={"dx": dx, "ddt": ddt_given, "dB": dB, "dC": dC, "dz": layout.heads_view(dz)},
        )
        dxBC_update, dweight, dbias, *_ = causal_conv1d_bwd_function(
            _conv_channels_last(xBC),
            conv1d_weight,
            conv1d_bias,
            _conv_channels_last(dxBC),
            seq_idx,
            None,
            None,
            _conv_channels_last(dxBC_given),
            False,
            ctx.silu,
        )
        dxBC_update = rearrange(dxBC_update, "b d s -> b s d")
        if dxBC_given.stride() != dxBC_update.stride():
            dxBC_given.copy_(dxBC_update)
        return (dzxbcdt, dweight, dbias, ddt_bias, dA, dD) + (None,) * 6


def mamba_split_conv1d_scan_keep(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: Optional[torch.Tensor],
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    seq_idx: Optional[torch.Tensor] = None,
    dt_limit: Tuple[float, float] = NO_DT_LIMIT,
    activation: Optional[str] = "silu",
    headdim: Optional[int] = None,
    ngroups: int = 1,
) -> torch.Tensor:
    """``mamba_ssm``'s ``mamba_split_conv1d_scan_combined`` as ``MambaMixer`` calls it (no gated
    RMSNorm, output projection, non-SSM channels or states), keeping the convolution output and
    the scan's intermediates for the backward instead of recomputing them there. Same output and
    gradients, bit for bit. CUDA tensors only.

    Args:
        zxbcdt: in_proj output ``(b, l, 2 * d_inner + 2 * groups * state + heads)``, channels
            ``[z | x | B | C | dt]``.
        conv1d_weight: ``(d_inner + 2 * groups * state, width)``.
        conv1d_bias: ``(d_inner + 2 * groups * state,)`` or None.
        dt_bias: ``(heads,)``.
        A: ``(heads,)``.
        D: ``(heads, headdim)`` or ``(heads,)`` (then ``headdim`` is needed).
        chunk_size: tokens per chunk of the scan.
        seq_idx: ``(b, l)`` int32 sequence index of every token (packed sequences).
        dt_limit: clamp of ``dt`` after softplus.
        activation: ``"silu"`` / ``"swish"`` after the convolution, or None.
        headdim: channels per head when ``D`` has one value per head.
        ngroups: groups of B and C.

    Returns:
        The gated scan output ``(b, l, d_inner)``.
    """
    problems = kernel_interface_problems()
    if problems:
        raise RuntimeError(
            "--mamba-keep-ssd-activations needs mamba_ssm's Triton kernels and causal_conv1d: "
            + "; ".join(problems)
        )
    if not zxbcdt.is_cuda:
        raise ValueError(
            "mamba_split_conv1d_scan_keep runs the CUDA kernels: zxbcdt is not on a GPU"
        )
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return _SplitConv1dScanKeepFn.apply(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        seq_idx,
        dt_limit,
        activation,
        headdim,
        ngroups,
    )
