"""Trained models and their artifacts: the annotator network, normalisation, augmentation, metrics."""

from ._annotator import Annotator

__all__ = ["Annotator"]
