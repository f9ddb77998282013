"""Rebuild the small datasets bundled in ``src/cellmint/datasets/_data`` from ``../shared/data``.

Run from the repository root: ``python tools/bundle_datasets.py``. Every reduction is deterministic
(seed 0) and described in ``cellmint.datasets._registry``; the script prints the sha256 values that
the registry must carry.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "src" / "cellmint" / "datasets" / "_data"


def _integer_counts(adata: ad.AnnData) -> ad.AnnData:
    X = adata.X.tocsr()
    if not np.array_equal(X.data, np.round(X.data)):
        raise ValueError("expected integer counts")
    X.data = X.data.astype(np.int32)  # integers compress better than float32 and load as counts
    adata.X = X
    return adata


def _write(adata: ad.AnnData, name: str) -> None:
    path = OUT / name
    uns, adata.uns = dict(adata.uns), {}
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "/", adata, dataset_kwargs={"compression": "gzip", "compression_opts": 9, "shuffle": True})
        ad.io.write_elem(f, "uns", uns)  # scalars in uns take no filters
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{name}: {adata.n_obs} x {adata.n_vars}, {path.stat().st_size / 1e6:.2f} MB, sha256 {digest}")


def cellbench() -> None:
    """Singlets; all Drop-seq cells and 60 CEL-seq2 cells per cell line; genes detected in >= 1% of them."""
    adata = ad.read_h5ad(SHARED / "cellbench_5cl_celseq2_dropseq.h5ad")
    adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    rng = np.random.default_rng(0)
    keep = []
    for (_, tech), idx in sorted(adata.obs.groupby(["cell_line", "technology"], observed=True).indices.items()):
        keep.extend(idx if tech == "Drop-seq" else rng.choice(idx, min(60, len(idx)), replace=False))
    adata = adata[np.sort(keep)].copy()
    detected = np.asarray((adata.X > 0).mean(axis=0)).ravel()
    adata = adata[:, detected >= 0.01].copy()
    adata.obs = adata.obs.drop(columns=["demuxlet_cls", "outliers"])
    for col in adata.obs.select_dtypes("category"):
        adata.obs[col] = adata.obs[col].cat.remove_unused_categories()
    _write(_integer_counts(adata), "cellbench_celseq2_dropseq.h5ad")


def copy_as_is(source: str, name: str) -> None:
    """Whole dataset, recompressed (gzip 9 + shuffle) with integer counts."""
    adata = ad.read_h5ad(SHARED / source)
    _write(_integer_counts(adata), name)


if __name__ == "__main__":
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found")
    OUT.mkdir(parents=True, exist_ok=True)
    cellbench()
    copy_as_is("cellbench_3cl_10x.h5ad", "cellbench_10x.h5ad")
    copy_as_is("glioblastoma_panobinostat.h5ad", "glioblastoma_panobinostat.h5ad")
    copy_as_is("papalexi_crispr_thp1.h5ad", "papalexi_crispr_thp1.h5ad")
