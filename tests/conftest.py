"""Shared fixtures: small generated matrices in every storage cellmint reads, and the real data folder."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import scipy.sparse as sp

from _helpers import make_counts, write_zarr_v3

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets of ../shared/data; tests using it skip on machines without that folder."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test: {SHARED_DATA} is not present on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def counts() -> sp.csr_matrix:
    return make_counts()


@pytest.fixture(scope="session")
def counts_adata(counts) -> ad.AnnData:
    adata = ad.AnnData(
        X=counts.copy(),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(counts.shape[1])]),
    )
    adata.layers["dense"] = counts.toarray()
    adata.layers["csc"] = counts.tocsc()
    return adata


@pytest.fixture(scope="session")
def h5ad_path(counts_adata, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("h5ad") / "counts.h5ad"
    counts_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def zarr_path(counts_adata, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zarr") / "counts.zarr"
    write_zarr_v3(counts_adata, path)
    return path
