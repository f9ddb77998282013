"""Real single-cell datasets (small ones bundled, larger ones fetched and verified) and a synthetic generator."""

from ._real import (
    available,
    cbmc_citeseq,
    cellbench,
    cellbench_10x,
    cellbench_full,
    glioblastoma_panobinostat,
    load,
    mouse_bladder,
    papalexi_crispr,
    pbmc3k,
    pbmc_facs_sorted,
    worm_neuron,
    zeisel_brain,
)
from ._synthetic import synthetic

__all__ = [
    "available",
    "load",
    "synthetic",
    "cellbench",
    "cellbench_10x",
    "glioblastoma_panobinostat",
    "papalexi_crispr",
    "cellbench_full",
    "pbmc3k",
    "pbmc_facs_sorted",
    "cbmc_citeseq",
    "zeisel_brain",
    "mouse_bladder",
    "worm_neuron",
]
