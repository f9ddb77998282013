from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _helpers import make_counts
from cellmint._utils._h5ad import write_h5ad_streamed


def _frames(n_obs, n_vars):
    return (
        pd.DataFrame({"group": pd.Categorical(np.arange(n_obs) % 3)}, index=[f"c{i}" for i in range(n_obs)]),
        pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
    )


def test_streamed_file_equals_the_blocks_in_memory_and_backed(tmp_path):
    X = make_counts(503, 41)
    obs, var = _frames(*X.shape)
    blocks = (X[s : s + 37] for s in range(0, X.shape[0], 37))
    path = write_h5ad_streamed(tmp_path / "x.h5ad", blocks, obs=obs, var=var, uns={"k": 1}, buffer_rows=100)
    adata = ad.read_h5ad(path)
    assert (adata.X != X).nnz == 0
    assert adata.X.dtype == np.float32
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert adata.uns["k"] == 1
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert (backed.X[100:200] != X[100:200]).nnz == 0
    finally:
        backed.file.close()
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5ad"]


def test_row_count_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    X = make_counts(50, 10)
    obs, var = _frames(60, 10)
    with pytest.raises(ValueError, match="The blocks held 50 cells, but obs has 60"):
        write_h5ad_streamed(tmp_path / "x.h5ad", [X], obs=obs, var=var)
    with pytest.raises(ValueError, match="does not fit"):
        write_h5ad_streamed(tmp_path / "x.h5ad", [sp.csr_matrix((60, 11), dtype=np.float32)], obs=obs, var=var)
    assert list(tmp_path.iterdir()) == []
