"""cellmint: atlas-scale single-cell data to trusted cell-type annotators and perturbation models."""

__version__ = "0.1.0.dev0"  # first: submodules record it (store manifests, model artifacts)

from . import datasets, io, pl, pp, tl
from .models import Annotator, PerturbationModel
from .store import Store

__all__ = ["datasets", "io", "pl", "pp", "tl", "Annotator", "PerturbationModel", "Store", "__version__"]
