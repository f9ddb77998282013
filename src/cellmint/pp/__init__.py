"""Preprocessing: statistics and on-disk stores for atlas-scale data (``cm.pp``)."""

from ._select_hvgs import select_hvgs

__all__ = ["select_hvgs"]
