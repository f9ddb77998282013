"""Tools: train and apply annotators and perturbation models (``cm.tl``)."""

from ._annotate import annotate
from ._train_annotator import train_annotator

__all__ = ["train_annotator", "annotate"]
