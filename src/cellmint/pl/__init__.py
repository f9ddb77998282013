"""Plotting: the figures a biologist checks before trusting results (``cm.pl``)."""

from ._confidence import confidence

__all__ = ["confidence"]
