"""Preprocessing: statistics and on-disk stores for atlas-scale data (``cm.pp``)."""

from ._build_store import build_store
from ._cell_sentences import cell_sentences
from ._select_hvgs import select_hvgs

__all__ = ["select_hvgs", "build_store", "cell_sentences"]
