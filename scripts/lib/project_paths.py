"""Where the project's importable code lives, and the one function that puts it on sys.path.

Scripts and tests import project code (the patched Megatron tree, its checkpoint tools, the
overlay, test helpers, ``scripts/lib``) through :func:`use` instead of inserting paths of their
own. Reaching this module takes one line in a script (``scripts/lib`` first on the path);
``tests/conftest.py`` does it for every test::

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "lib"))
    from project_paths import use

    use("tests", "checkpoint_tools", megatron=args.megatron)

The patched tree is ``megatron`` when given, else ``$FALCON_MCORE_BUILD``, else
``build/Megatron-LM`` (made by ``make apply-patches``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

ROOT = Path(__file__).resolve().parents[2]

# Places inside this checkout.
_PLACES = {
    "scripts": ROOT / "scripts",
    "scripts_lib": ROOT / "scripts" / "lib",
    "falcon_h1_scripts": ROOT / "scripts" / "falcon_h1",
    "tests": ROOT / "tests",
    "overlay": ROOT / "megatron_overlay",
    "overlay_checkpoint_tools": ROOT / "megatron_overlay" / "tools" / "checkpoint",
}
# Places inside the patched Megatron tree.
_TREE_PLACES = {"megatron": Path("."), "checkpoint_tools": Path("tools") / "checkpoint"}
NAMES = tuple(_PLACES) + tuple(_TREE_PLACES)


def megatron_tree(megatron: Optional[Union[str, Path]] = None) -> Path:
    """The patched Megatron tree: ``megatron``, else ``$FALCON_MCORE_BUILD``, else the build
    tree of this checkout."""
    if megatron is not None:
        return Path(megatron)
    return Path(os.environ.get("FALCON_MCORE_BUILD", ROOT / "build" / "Megatron-LM"))


def place(name: str, megatron: Optional[Union[str, Path]] = None) -> Path:
    """The directory a name of :data:`NAMES` stands for."""
    if name in _PLACES:
        return _PLACES[name]
    if name in _TREE_PLACES:
        return megatron_tree(megatron) / _TREE_PLACES[name]
    raise ValueError(f"unknown project place {name!r}; known: {', '.join(NAMES)}")


def use(*names: str, megatron: Optional[Union[str, Path]] = None) -> None:
    """Put the places ``names`` (see :data:`NAMES`) at the front of ``sys.path``, the first
    name searched first; a place already on the path stays where it is."""
    for name in reversed(names):
        path = str(place(name, megatron))
        if path not in sys.path:
            sys.path.insert(0, path)


def load_script(path: Union[str, Path], name: Optional[str] = None) -> ModuleType:
    """The project file ``path`` (absolute, or relative to the checkout) as a module named
    ``name`` (default: its stem), loaded once: later calls return the same module from
    ``sys.modules``. For scripts that are not importable packages (``scripts/*.py``)."""
    path = Path(path) if Path(path).is_absolute() else ROOT / path
    name = name or path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
