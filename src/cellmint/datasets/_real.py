"""Loaders for real datasets, one public function per entry of the registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pandas as pd

from ._fetch import bundled_path, cache_dir, dataset_path
from ._registry import DATASETS, DatasetInfo


def load(
    name: str, *, data_dir: str | Path | None = None, backed: bool = False, progress: bool | None = None
) -> ad.AnnData:
    """Load a real dataset by name (see :func:`available`).

    Parameters
    ----------
    name
        Dataset name, e.g. ``"cellbench"``.
    data_dir
        Folder holding the file, for datasets that are not bundled (also ``CELLMINT_DATA_DIR``).
    backed
        Open the file in backed mode (``X`` stays on disk) instead of loading it.
    progress
        Progress bar while downloading.

    Returns
    -------
    The dataset; ``uns["dataset"]`` holds its name, citation, source and licence.
    """
    if name not in DATASETS:
        raise KeyError(f"Unknown dataset {name!r}; available: {', '.join(DATASETS)}.")
    info = DATASETS[name]
    path = dataset_path(info, data_dir=data_dir, progress=progress)
    adata = ad.read_h5ad(path, backed="r" if backed else None)
    adata.uns["dataset"] = {
        "name": info.name,
        "citation": info.citation,
        "source": info.source,
        "licence": info.licence,
        "sha256": info.sha256,
    }
    return adata


def available() -> pd.DataFrame:
    """Every real dataset cellmint can load, with shape, labels, whether it is bundled and its citation.

    Returns
    -------
    One row per dataset (index: name) with columns ``n_obs``, ``n_vars``, ``labels``, ``bundled``,
    ``local`` (file present in the package or cache), ``description``, ``citation``, ``source``,
    ``licence``.
    """
    rows = []
    for info in DATASETS.values():
        local = bundled_path(info) if info.bundled else cache_dir() / info.filename
        rows.append(
            {
                "name": info.name,
                "n_obs": info.n_obs,
                "n_vars": info.n_vars,
                "labels": ", ".join(info.labels),
                "bundled": info.bundled,
                "local": local.is_file(),
                "description": info.description,
                "citation": info.citation,
                "source": info.source,
                "licence": info.licence,
            }
        )
    return pd.DataFrame(rows).set_index("name")


def _make_loader(info: DatasetInfo) -> Callable[..., ad.AnnData]:
    def loader(*, data_dir: str | Path | None = None, backed: bool = False, progress: bool | None = None) -> ad.AnnData:
        return load(info.name, data_dir=data_dir, backed=backed, progress=progress)

    where = (
        "Bundled with cellmint (no download); `data_dir` is ignored."
        if info.bundled
        else "Not bundled: read from `data_dir`, ``CELLMINT_DATA_DIR`` or the cache, after a sha256 check."
    )
    loader.__name__ = loader.__qualname__ = info.name
    loader.__doc__ = f"""{info.description}

    {info.n_obs} cells × {info.n_vars} genes; labels in ``obs``: {", ".join(f"``{k}``" for k in info.labels) or "none"}.
    {where}

    Source: {info.source} ({info.licence}). Please cite: {info.citation}

    Parameters
    ----------
    data_dir
        Folder holding the file (datasets that are not bundled).
    backed
        Open in backed mode (``X`` stays on disk).
    progress
        Progress bar while downloading.

    Returns
    -------
    The dataset as :class:`~anndata.AnnData`; ``uns["dataset"]`` records name, citation, source, licence and sha256.
    """
    return loader


_LOADERS = {name: _make_loader(info) for name, info in DATASETS.items()}
cellbench = _LOADERS["cellbench"]
cellbench_10x = _LOADERS["cellbench_10x"]
glioblastoma_panobinostat = _LOADERS["glioblastoma_panobinostat"]
papalexi_crispr = _LOADERS["papalexi_crispr"]
cellbench_full = _LOADERS["cellbench_full"]
pbmc3k = _LOADERS["pbmc3k"]
pbmc_facs_sorted = _LOADERS["pbmc_facs_sorted"]
cbmc_citeseq = _LOADERS["cbmc_citeseq"]
zeisel_brain = _LOADERS["zeisel_brain"]
mouse_bladder = _LOADERS["mouse_bladder"]
worm_neuron = _LOADERS["worm_neuron"]
