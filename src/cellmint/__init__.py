"""cellmint: atlas-scale single-cell data to trusted cell-type annotators and perturbation models."""

from . import datasets, io, pl, pp, tl

__version__ = "0.1.0.dev0"

__all__ = ["datasets", "io", "pl", "pp", "tl", "__version__"]
