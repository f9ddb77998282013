"""Generators shared by tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp


def make_counts(n_obs: int = 1037, n_vars: int = 53, density: float = 0.1, seed: int = 0) -> sp.csr_matrix:
    """Integer counts with an all-zero gene and an all-zero cell, as real matrices have."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_obs, n_vars, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X = X.tolil()
    if n_vars > 3:
        X[:, 3] = 0
    if n_obs > 5:
        X[5, :] = 0
    return X.tocsr()


def write_zarr_v3(adata: ad.AnnData, path) -> None:
    """Write zarr format 3 with any anndata: older versions need the setting, 0.13+ deprecates it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This setting will be removed", DeprecationWarning)
        with ad.settings.override(zarr_write_format=3):
            adata.write_zarr(path)
