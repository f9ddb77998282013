"""Trained models and their artifacts: annotator and perturbation networks, normalisation, augmentation.

The two model classes load on first use, so that the torch-free floors here (``_scale``: what a matrix
holds) can be imported by the tools that need no network (``pp.select_hvgs``, ``pp.cell_sentences``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Annotator", "PerturbationModel"]
_LAZY = {"Annotator": "._annotator", "PerturbationModel": "._perturbation"}

if TYPE_CHECKING:  # pragma: no cover
    from ._annotator import Annotator
    from ._perturbation import PerturbationModel


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
