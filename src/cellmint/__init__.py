"""cellmint: atlas-scale single-cell data to trusted cell-type annotators and perturbation models."""

import os as _os
import sys as _sys

# OpenMP threads that wait for work sleep instead of spinning, when torch is not loaded yet (libgomp reads
# this once, when torch loads it). Spinning threads take the cores other processes need: on a shared
# 2-core machine at load 13, training a 1,000-cell reference took 24.6 s spinning and 2.8 s sleeping, for
# the same result (docs/speed.md). A value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0.dev0"  # first: submodules record it (store manifests, model artifacts)

from . import datasets, io, pl, pp, tl
from .models import Annotator, PerturbationModel
from .store import Store

__all__ = ["datasets", "io", "pl", "pp", "tl", "Annotator", "PerturbationModel", "Store", "__version__"]
