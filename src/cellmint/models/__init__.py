"""Trained models and their artifacts: annotator and perturbation networks, normalisation, augmentation, metrics."""

from ._annotator import Annotator
from ._perturbation import PerturbationModel

__all__ = ["Annotator", "PerturbationModel"]
