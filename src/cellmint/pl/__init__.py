"""Plotting: the figures a biologist checks before trusting results (``cm.pl``)."""

from ._confidence import confidence
from ._perturbation import perturbation

__all__ = ["confidence", "perturbation"]
