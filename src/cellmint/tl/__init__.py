"""Tools: train and apply annotators and perturbation models (``cm.tl``)."""

from ._annotate import annotate
from ._evaluate_perturbation import evaluate_perturbation
from ._perturbation_baselines import perturbation_baselines
from ._perturbation_scores import perturbation_summary
from ._perturbation_split import perturbation_split
from ._predict_perturbation import predict_perturbation
from ._train_annotator import train_annotator
from ._train_perturbation import train_perturbation

__all__ = [
    "train_annotator",
    "annotate",
    "perturbation_split",
    "train_perturbation",
    "predict_perturbation",
    "perturbation_baselines",
    "evaluate_perturbation",
    "perturbation_summary",
]
