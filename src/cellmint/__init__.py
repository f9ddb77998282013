"""cellmint: atlas-scale single-cell data to trusted cell-type annotators and perturbation models.

The namespaces (``pp``, ``tl``, ``pl``, ``io``, ``datasets``) and classes are imported on first use,
so that ``import cellmint`` and ``cellmint --help`` stay fast (torch and scanpy load only when a
tool needs them); ``import cellmint as cm; cm.pp.select_hvgs(...)`` works as with eager imports.
"""

from __future__ import annotations

import importlib
import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any

from ._version import __version__

# OpenMP threads that wait for work sleep instead of spinning, when torch is not loaded yet (libgomp reads
# this once, when torch loads it). Spinning threads take the cores other processes need: on a shared
# 2-core machine at load 13, training a 1,000-cell reference took 24.6 s spinning and 2.8 s sleeping, for
# the same result (docs/speed.md). A value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: public name -> (module, attribute or None for the module itself)
_LAZY = {
    "datasets": (".datasets", None),
    "io": (".io", None),
    "pl": (".pl", None),
    "pp": (".pp", None),
    "tl": (".tl", None),
    "Annotator": (".models", "Annotator"),
    "PerturbationModel": (".models", "PerturbationModel"),
    "Store": (".store", "Store"),
}

__all__ = ["datasets", "io", "pl", "pp", "tl", "Annotator", "PerturbationModel", "Store", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, pl, pp, tl
    from .models import Annotator, PerturbationModel
    from .store import Store


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cellmint' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
