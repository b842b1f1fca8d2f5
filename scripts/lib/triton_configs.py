"""Let the autotuned Triton kernels of a package compile one configuration instead of all.

For correctness checks on a cold Triton cache: an autotuner compiles (one ``ptxas`` at a time)
and times every configuration of its kernel for each new key; mamba_ssm's SSD kernels list up
to 11 each, and with fp32 ``tl.dot`` in IEEE precision a single check case ran past 290 s on an
H200 without finishing. A configuration only chooses tile sizes, pipelining and warps (the
order of the sums), not what a kernel computes, so checking one of them checks the kernel.
This keeps, per autotuner, the configuration with the smallest tiles (product of its integer
meta-parameters; then fewest stages and warps): the one least likely to exceed shared memory
with fp32 operands. Not for benchmarks: the kept configuration is not the fastest.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sys


def _size(config) -> tuple:
    ints = [v for v in config.kwargs.values() if isinstance(v, int) and not isinstance(v, bool)]
    return (math.prod(ints), config.num_stages, config.num_warps)


def autotuners(package: str) -> list:
    """Autotuner objects reachable from the loaded modules of ``package`` (also when wrapped
    by ``triton.heuristics`` or ``triton.jit`` objects that keep the tuner as ``.fn``)."""
    from triton.runtime.autotuner import Autotuner

    found: dict[int, Autotuner] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in vars(module).values():
            seen = 0
            while value is not None and seen < 8:  # heuristics(autotune(jit(fn))) chains
                if isinstance(value, Autotuner):
                    found[id(value)] = value
                value, seen = getattr(value, "fn", None), seen + 1
    return list(found.values())


def keep_smallest_config(package: str) -> dict[str, int]:
    """Import every module of ``package`` (a package of Triton kernels, e.g.
    ``mamba_ssm.ops.triton``) and cut each of its autotuners down to its smallest
    configuration; returns the number of autotuners found and of configurations dropped."""
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(getattr(root, "__path__", []), package + "."):
        importlib.import_module(info.name)
    tuners = autotuners(package)
    dropped = 0
    for tuner in tuners:
        if len(tuner.configs) > 1:
            dropped += len(tuner.configs) - 1
            tuner.configs = [min(tuner.configs, key=_size)]
    return {"autotuners": len(tuners), "configs_dropped": dropped}
