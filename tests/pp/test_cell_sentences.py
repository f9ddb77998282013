"""cm.pp.cell_sentences against a NumPy argsort reference, on real and synthetic data, in every storage."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellmint as cm
from _helpers import write_zarr_v3
from cellmint.pp._cell_sentences import cell_sentences


def reference(X, names, n_genes: int) -> list[str]:
    """Top genes by a stable argsort of the dense rows: largest first, ties in gene order, zeros never."""
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    out = []
    for row in X:
        order = np.argsort(-row, kind="stable")
        order = order[row[order] > 0][:n_genes]
        out.append(" ".join(np.asarray(names)[order]))
    return out


@pytest.fixture(scope="module")
def cellbench():
    return cm.datasets.cellbench()


@pytest.fixture(scope="module")
def synthetic():
    adata = cm.datasets.synthetic(400, 300, random_state=3, progress=False)
    keep = np.ones(adata.n_obs)
    keep[7] = 0  # a cell without any expressed gene
    adata.X = sp.csr_matrix(sp.diags(keep) @ adata.X)
    adata.X.eliminate_zeros()
    return adata


def test_real_counts_match_argsort(cellbench):
    adata = cellbench.copy()
    cell_sentences(adata, n_genes=50)
    expected = reference(adata.X, adata.var_names, 50)
    assert adata.obs["cell_sentence"].tolist() == expected
    assert adata.obs["cell_sentence_id"].tolist() == list(adata.obs_names)
    assert all(len(s.split()) == 50 for s in expected)  # CellBench cells express thousands of genes
    assert adata.uns["cell_sentence"] == {"params": {"n_genes": 50, "id_key": "cell_sentence_id"}}


@pytest.mark.parametrize("n_genes", [1, 3, 40, 1000])
def test_synthetic_counts_with_ties_match_argsort(synthetic, n_genes):
    adata = synthetic.copy()
    cell_sentences(adata, n_genes=n_genes, key_added="cs")
    assert adata.obs["cs"].tolist() == reference(adata.X, adata.var_names, n_genes)
    assert adata.obs["cs"].iloc[7] == ""
    X = adata.X.toarray()
    ties = sum(len(np.unique(r[r > 0])) < (r > 0).sum() for r in X)
    assert ties > 300  # counts tie often: the tie-break is exercised


def test_normalised_layer_and_gene_symbols(synthetic):
    adata = synthetic.copy()
    adata.layers["log"] = adata.X.copy()
    adata.layers["log"].data = np.log1p(adata.layers["log"].data / 7).astype(np.float64)
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    cell_sentences(adata, n_genes=10, layer="log", gene_name_key="symbol")
    assert adata.obs["cell_sentence"].tolist() == reference(adata.layers["log"], adata.var["symbol"], 10)
    assert adata.uns["cell_sentence"]["params"] == {"n_genes": 10, "gene_name_key": "symbol", "layer": "log",
                                                    "id_key": "cell_sentence_id"}  # fmt: skip
    adata.layers["half"] = adata.layers["log"].toarray().astype(np.float16)  # rounded values: more ties
    cell_sentences(adata, n_genes=10, layer="half", key_added="half")
    assert adata.obs["half"].tolist() == reference(adata.layers["half"].astype(np.float32), adata.var_names, 10)


def test_explicit_zeros_unsorted_and_duplicate_entries():
    # row 0: genes 2 and 0 listed out of order, an explicit zero at gene 1, gene 3 stored twice (1 + 2 = 3)
    X = sp.csr_matrix((np.array([5.0, 0.0, 1.0, 1.0, 2.0]), np.array([2, 1, 0, 3, 3]), np.array([0, 5])), shape=(1, 4))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=list("abcd")))
    cell_sentences(adata, n_genes=4)
    assert adata.obs["cell_sentence"].iloc[0] == "c d a"
    assert X.indices.tolist() == [2, 1, 0, 3, 3]  # the input is left as it was


@pytest.mark.parametrize("storage", ["dense", "csc", "backed", "path_h5ad", "path_zarr", "backed_view"])
def test_every_storage_gives_the_in_memory_sentences(synthetic, storage, tmp_path):
    expected = reference(synthetic.X, synthetic.var_names, 25)
    if storage in {"dense", "csc"}:
        adata = synthetic.copy()
        adata.X = adata.X.toarray() if storage == "dense" else sp.csc_matrix(adata.X)
        cell_sentences(adata, n_genes=25, chunk_size=37)
        assert adata.obs["cell_sentence"].tolist() == expected
        return
    path = tmp_path / ("data.zarr" if storage == "path_zarr" else "data.h5ad")
    write_zarr_v3(synthetic, path) if storage == "path_zarr" else synthetic.write_h5ad(path)
    if storage.startswith("path"):
        df = cell_sentences(path, n_genes=25, chunk_size=37)
        assert df["cell_sentence"].tolist() == expected
        assert df["cell_sentence_id"].tolist() == list(synthetic.obs_names)
        assert list(df.index) == list(synthetic.obs_names)
        return
    backed = ad.read_h5ad(path, backed="r")
    if storage == "backed_view":
        with pytest.raises(ValueError, match="view of a backed AnnData"):
            cell_sentences(backed[10:20], n_genes=25)
    else:
        cell_sentences(backed, n_genes=25, chunk_size=37)
        assert backed.obs["cell_sentence"].tolist() == expected
    backed.file.close()


def test_copy_and_h5ad_round_trip(synthetic, tmp_path):
    adata = synthetic.copy()
    out = cell_sentences(adata, n_genes=5, copy=True)
    assert "cell_sentence" not in adata.obs
    assert "cell_sentence" not in adata.uns
    out.write_h5ad(tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    assert back.obs["cell_sentence"].tolist() == out.obs["cell_sentence"].tolist()
    assert back.uns["cell_sentence"]["params"]["n_genes"] == 5


def test_bad_input_is_refused_with_a_clear_message(synthetic):
    adata = synthetic[:20].copy()
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="n_genes must be a positive integer"):
            cell_sentences(adata, n_genes=bad)
    with pytest.raises(KeyError, match="gene_name_key 'symbol' is not a column of var"):
        cell_sentences(adata, gene_name_key="symbol")
    adata.var["symbol"] = ["G1", "G1"] + [f"g{i}" for i in range(adata.n_vars - 2)]
    with pytest.raises(ValueError, match=r"var\['symbol'\] holds 1 duplicated gene names \(e.g. \['G1'\]\)"):
        cell_sentences(adata, gene_name_key="symbol")
    adata.var["symbol"] = ["HLA A"] + [f"g{i}" for i in range(adata.n_vars - 1)]
    with pytest.raises(ValueError, match="names with whitespace"):
        cell_sentences(adata, gene_name_key="symbol")
    adata.var["symbol"] = [None] + [f"g{i}" for i in range(adata.n_vars - 1)]
    with pytest.raises(ValueError, match="1 missing gene names"):
        cell_sentences(adata, gene_name_key="symbol")
    nan = adata.copy()
    nan.X.data[3] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        cell_sentences(nan)
    scaled = adata.copy()
    scaled.layers["scaled"] = scaled.X.toarray() - 1.0
    with pytest.raises(ValueError, match=r"layers\['scaled'\] has negative values \(cell 0\)"):
        cell_sentences(scaled, layer="scaled")
    with pytest.raises(TypeError, match="must be an AnnData or a path"):
        cell_sentences(adata.X)
    assert "cell_sentence" not in adata.obs  # nothing written by a failed call
