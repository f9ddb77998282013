"""Tools: train and apply annotators and perturbation models (``cm.tl``)."""

from ._train_annotator import train_annotator

__all__ = ["train_annotator"]
