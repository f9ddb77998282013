"""The query's values over the model's panel: genes matched once, the CSR chunk scattered in one compiled pass."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellmint.models._annotator import _dense_on
from cellmint.models._normalize import InputRecipe
from cellmint.tl._annotation_query import QueryRows


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "csr for the device"])
def test_panel_values_match_column_selection_with_missing_reordered_and_duplicated_genes(dense):
    rng = np.random.default_rng(0)
    X = sp.random(300, 50, density=0.3, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 9, n))
    X = X.astype(np.float32)
    # a non-canonical chunk: one value stored twice for the same gene (toarray adds them)
    coo = X.tocoo()
    duplicated = sp.csr_matrix((np.r_[coo.data, [5.0]], (np.r_[coo.row, [0]], np.r_[coo.col, [coo.col[0]]])),
                               shape=X.shape)  # fmt: skip
    duplicated.has_canonical_format = False
    query_genes = pd.Index([f"g{i}" for i in range(50)])
    model_genes = pd.Index([f"g{i}" for i in rng.permutation(50)[:30]] + ["absent1", "absent2"])
    adata = ad.AnnData(duplicated, var=pd.DataFrame(index=query_genes))
    rows = QueryRows(adata, adata, model_genes, InputRecipe(), layer=None, gene_key=None, strip_versions=False)
    chunks = list(rows.chunks(64, progress=False, dense=dense))
    if dense:
        values = np.concatenate([chunk[2] for chunk in chunks])
    else:  # what a GPU is sent: the panel's stored values, each gene once per cell, densified there
        assert all(sp.issparse(chunk[2]) and chunk[2].shape == (chunk[1] - chunk[0], 32) for chunk in chunks)
        assert chunks[0][2].nnz < 0.4 * chunks[0][2].shape[0] * 32
        assert len(set(chunks[0][2][0].indices)) == chunks[0][2][0].nnz  # row 0's duplicate stored once
        values = np.concatenate([_dense_on(chunk[2], torch.device("cpu")).numpy() for chunk in chunks])
        np.testing.assert_array_equal(np.concatenate([chunk[2].toarray() for chunk in chunks]), values)
    library = np.concatenate([chunk[3] for chunk in chunks])
    full = duplicated.toarray()
    expected = np.zeros((300, len(model_genes)), dtype=np.float32)
    found = query_genes.get_indexer(model_genes)
    expected[:, found >= 0] = full[:, found[found >= 0]]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_allclose(library, full.sum(axis=1))
