"""cm.pp.select_hvgs against scanpy.pp.highly_variable_genes, on every kind of input cellmint reads."""

from __future__ import annotations

import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import cellmint as cm
from _helpers import write_zarr_v3

FLAVORS = ["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"]
STORAGES = ["csr", "csc", "dense", "backed", "path_h5ad", "path_zarr", "dask"]


def counts_with_batches(n_obs=1500, n_vars=400, seed=0) -> ad.AnnData:
    """Synthetic NB counts with three batches and some all-zero genes."""
    adata = cm.datasets.synthetic(n_obs, n_vars, n_batches=3, n_donors=3, random_state=seed, progress=False)
    X = adata.X.tolil()
    X[:, [0, 7, 99]] = 0  # never detected anywhere
    X[np.flatnonzero(adata.obs["batch"] == "batch_1"), 5] = 0  # never detected in one batch
    adata.X = X.tocsr()
    adata.obs["batch"] = adata.obs["batch"].astype(str)  # plain strings, as many files carry them
    return adata


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def as_storage(adata: ad.AnnData, storage: str, tmp_path):
    """The same data as in-memory CSR/CSC/dense, backed h5ad, a path, or dask-backed AnnData."""
    if storage in {"csr", "csc", "dense"}:
        out = adata.copy()
        out.X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: m.toarray()}[storage](adata.X)
        return out
    if storage in {"backed", "path_h5ad", "dask"}:
        path = tmp_path / "data.h5ad"
        adata.write_h5ad(path)
        if storage == "backed":
            return ad.read_h5ad(path, backed="r")
        if storage == "path_h5ad":
            return path
        pytest.importorskip("dask")
        from anndata.experimental import read_lazy

        lazy = read_lazy(path)
        lazy.obs = adata.obs.copy()  # a pandas obs, as after .to_memory() of the annotations
        lazy.uns = dict(adata.uns)
        return lazy
    path = tmp_path / "data.zarr"
    write_zarr_v3(adata, path)
    return path


def run_both(adata, data, chunk_size=None, **kwargs):
    expected = sc.pp.highly_variable_genes(adata.copy(), inplace=False, **kwargs)
    result = cm.pp.select_hvgs(data, inplace=False, chunk_size=chunk_size, **kwargs)
    return expected, result


def assert_same_table(expected: pd.DataFrame, result: pd.DataFrame, *, exact: bool) -> None:
    assert list(result.columns) == list(expected.columns)
    assert set(result.index) == set(expected.index)
    result = result.loc[expected.index]  # scanpy sorts some tables by gene name
    assert result.dtypes.astype(str).to_dict() == expected.dtypes.astype(str).to_dict()
    assert set(result.index[result["highly_variable"]]) == set(expected.index[expected["highly_variable"]])
    for column in expected.columns:
        if column == "mean_bin":
            assert (result[column].astype(str) == expected[column].astype(str)).all()
        elif expected[column].dtype.kind == "f":
            if exact:
                np.testing.assert_array_equal(result[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
            else:
                np.testing.assert_allclose(result[column], expected[column], rtol=1e-5, equal_nan=True, err_msg=column)
        else:
            assert (result[column].to_numpy() == expected[column].to_numpy()).all(), column


def _data_for(flavor, counts):
    return counts if flavor.startswith("seurat_v3") else lognorm(counts)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("batch_key", [None, "batch"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_parity_with_scanpy_on_synthetic(flavor, batch_key, storage, tmp_path):
    adata = _data_for(flavor, counts_with_batches())
    data = as_storage(adata, storage, tmp_path)
    # scanpy runs in memory: on the same layout where it can, else on the CSR matrix the file holds
    reference = data if storage in {"csr", "csc", "dense"} else adata
    expected, result = run_both(reference, data, flavor=flavor, n_top_genes=100, batch_key=batch_key, chunk_size=128)
    # identical arithmetic, so identical bits, whatever the storage
    assert_same_table(expected, result, exact=True)


@pytest.mark.parametrize("batch_key", [None, "batch"])
@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_parity_with_cutoffs(flavor, batch_key):
    adata = lognorm(counts_with_batches(seed=3))
    cutoffs = {"min_mean": 0.05, "max_mean": 4.0, "min_disp": 0.3}
    expected, result = run_both(adata, adata, flavor=flavor, n_top_genes=None, batch_key=batch_key, **cutoffs)
    assert 0 < expected["highly_variable"].sum() < adata.n_vars
    assert_same_table(expected, result, exact=True)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_never_changes_the_answer(chunk_size):
    adata = counts_with_batches(n_obs=300, n_vars=200)
    expected, chunked = run_both(
        adata, adata, flavor="seurat_v3", n_top_genes=50, batch_key="batch", chunk_size=chunk_size
    )
    assert_same_table(expected, chunked, exact=True)


def test_log1p_base_is_honoured():
    adata = counts_with_batches(n_obs=400, n_vars=150)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata, base=2)
    expected, result = run_both(adata, adata, flavor="seurat", n_top_genes=40)
    assert_same_table(expected, result, exact=True)


@pytest.mark.realdata
@pytest.mark.parametrize("batch_key", [None, "half"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_parity_on_pbmc3k(shared_data, flavor, batch_key, tmp_path):
    adata = ad.read_h5ad(shared_data / "pbmc3k_raw.h5ad")
    adata.obs["half"] = np.where(np.arange(adata.n_obs) < adata.n_obs // 2, "first", "second")
    if flavor == "cell_ranger":  # scanpy's percentile bins need genes that were detected
        sc.pp.filter_genes(adata, min_cells=1)
    adata = _data_for(flavor, adata)
    data = as_storage(adata, "backed", tmp_path)
    expected, result = run_both(adata, data, flavor=flavor, n_top_genes=2000, batch_key=batch_key)
    data.file.close()
    assert_same_table(expected, result, exact=True)


@pytest.mark.realdata
def test_parity_on_cellbench_technologies(shared_data):
    adata = ad.read_h5ad(shared_data / "cellbench_5cl_celseq2_dropseq.h5ad")
    expected, result = run_both(adata, adata, flavor="seurat_v3", n_top_genes=3000, batch_key="technology")
    assert_same_table(expected, result, exact=True)


@settings(max_examples=25, deadline=None)
@given(
    n_obs=st.integers(20, 120),
    n_vars=st.integers(60, 150),
    density=st.floats(0.05, 0.9),
    n_batches=st.integers(1, 3),
    flavor=st.sampled_from(["seurat_v3", "seurat"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_sparsity(n_obs, n_vars, density, n_batches, flavor, seed):
    rng = np.random.default_rng(seed)
    X = sp.random(n_obs, n_vars, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * rng.integers(1, 30)).astype(np.float32)
    adata = ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
    adata.obs["batch"] = pd.Categorical(rng.integers(0, n_batches, n_obs).astype(str))
    if flavor == "seurat":
        sc.pp.log1p(adata)
    kwargs = {"flavor": flavor, "n_top_genes": 30, "batch_key": "batch" if n_batches > 1 else None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scanpy's own warnings on degenerate random data
            expected = sc.pp.highly_variable_genes(adata.copy(), inplace=False, **kwargs)
    except (ValueError, ZeroDivisionError, IndexError):
        with pytest.raises(ValueError, match=r"."):  # where scanpy cannot answer, cellmint says why
            cm.pp.select_hvgs(adata, inplace=False, chunk_size=17, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cm.pp.select_hvgs(adata, inplace=False, chunk_size=17, **kwargs)
    assert_same_table(expected, result, exact=True)


def test_inplace_writes_scanpy_columns_and_uns():
    adata = counts_with_batches(n_obs=500, n_vars=200)
    reference = adata.copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat_v3", n_top_genes=60, batch_key="batch")
    assert cm.pp.select_hvgs(adata, flavor="seurat_v3", n_top_genes=60, batch_key="batch") is None
    new = [c for c in reference.var.columns if c not in ("program", "program_log2fc")]
    assert list(adata.var.columns[2:]) == new
    pd.testing.assert_frame_equal(adata.var[new], reference.var[new])
    assert adata.uns["hvg"] == {"flavor": "seurat_v3"}


def test_inplace_dispersion_dtypes_match_scanpy():
    adata = lognorm(counts_with_batches(n_obs=400, n_vars=150))
    reference = adata.copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat", n_top_genes=40, batch_key="batch")
    cm.pp.select_hvgs(adata, flavor="seurat", n_top_genes=40, batch_key="batch")
    columns = [
        "highly_variable",
        "means",
        "dispersions",
        "dispersions_norm",
        "highly_variable_nbatches",
        "highly_variable_intersection",
    ]
    pd.testing.assert_frame_equal(adata.var[columns], reference.var[columns])


def test_key_added_names_every_mask_column():
    adata = counts_with_batches(n_obs=400, n_vars=150)
    cm.pp.select_hvgs(adata, n_top_genes=30, batch_key="batch", key_added="hvg_v3")
    assert {"hvg_v3", "hvg_v3_rank", "hvg_v3_nbatches"} <= set(adata.var.columns)
    assert "highly_variable" not in adata.var.columns
    assert adata.var["hvg_v3"].sum() == 30


def test_subset_in_memory_backed_and_table(tmp_path):
    adata = counts_with_batches(n_obs=400, n_vars=150)
    table = cm.pp.select_hvgs(adata, n_top_genes=25, inplace=False, subset=True)
    assert len(table) == 25
    assert table["highly_variable"].all()
    in_memory = adata.copy()
    assert cm.pp.select_hvgs(in_memory, n_top_genes=25, subset=True) is None
    assert in_memory.n_vars == 25
    assert list(in_memory.var_names) == list(table.index)
    path = tmp_path / "b.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = cm.pp.select_hvgs(backed, n_top_genes=25, subset=True)
    try:
        assert view.is_view
        assert view.isbacked
        assert list(view.var_names) == list(table.index)
        assert backed.n_vars == 150  # the file and the backed object keep every gene
        assert backed.var["highly_variable"].sum() == 25
        np.testing.assert_array_equal(view.X[:10].toarray(), adata[:10, table.index].X.toarray())
    finally:
        backed.file.close()


def test_backed_memory_is_bounded_by_the_chunk(tmp_path):
    adata = counts_with_batches(n_obs=20_000, n_vars=1000, seed=5)
    path = tmp_path / "big.h5ad"
    adata.write_h5ad(path)
    matrix_bytes = adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes
    backed = ad.read_h5ad(path, backed="r")
    cm.pp.select_hvgs(backed, n_top_genes=100, batch_key="batch", chunk_size=500)  # compile the kernels first
    tracemalloc.start()
    try:
        cm.pp.select_hvgs(backed, n_top_genes=100, batch_key="batch", chunk_size=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        backed.file.close()
    assert peak < matrix_bytes / 4, (peak, matrix_bytes)


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
def test_count_flavours_refuse_non_counts(flavor):
    adata = counts_with_batches(n_obs=200, n_vars=100)
    adata.layers["lognorm"] = np.log1p(adata.X)
    with pytest.raises(ValueError, match=r"expects raw counts, but layers\['lognorm'\] has non-integer values"):
        cm.pp.select_hvgs(adata, flavor=flavor, n_top_genes=20, layer="lognorm")
    negative = adata.copy()
    negative.X.data[3] = -2
    with pytest.raises(ValueError, match="expects raw counts, but X has negative values"):
        cm.pp.select_hvgs(negative, flavor=flavor, n_top_genes=20)
    # the explicit opt-out computes anyway (like scanpy, which only warns)
    table = cm.pp.select_hvgs(adata, flavor=flavor, n_top_genes=20, layer="lognorm", check_values=False, inplace=False)
    assert table["highly_variable"].sum() == 20


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_refused_for_every_flavour(bad):
    adata = lognorm(counts_with_batches(n_obs=200, n_vars=100))
    adata.X.data[10] = bad
    for flavor in FLAVORS:
        with pytest.raises(ValueError, match="contains NaN or infinite values"):
            cm.pp.select_hvgs(adata, flavor=flavor, n_top_genes=20, check_values=False)


def test_argument_errors(tmp_path):
    adata = counts_with_batches(n_obs=200, n_vars=100)
    with pytest.raises(KeyError, match="batch_key 'donor_id' is not a column of obs"):
        cm.pp.select_hvgs(adata, n_top_genes=20, batch_key="donor_id")
    with pytest.raises(ValueError, match="n_top_genes=500 is larger than the 100 genes available"):
        cm.pp.select_hvgs(adata, n_top_genes=500)
    with pytest.raises(ValueError, match="flavor must be one of"):
        cm.pp.select_hvgs(adata, flavor="pearson")
    with pytest.raises(ValueError, match="needs n_top_genes"):
        cm.pp.select_hvgs(adata, n_top_genes=None)
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        cm.pp.select_hvgs(adata, n_top_genes=20, layer="counts")
    missing = adata.copy()
    missing.obs["batch"] = missing.obs["batch"].astype(object)
    missing.obs.iloc[3, missing.obs.columns.get_loc("batch")] = None
    with pytest.raises(ValueError, match="no batch for 1 cells"):
        cm.pp.select_hvgs(missing, n_top_genes=20, batch_key="batch")
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(ValueError, match="opened read-only: pass inplace=False"):
        cm.pp.select_hvgs(path, n_top_genes=20)
    with pytest.raises(KeyError, match="batch_key 'nope' is not a column of obs in"):
        cm.pp.select_hvgs(path, n_top_genes=20, batch_key="nope", inplace=False)
    with pytest.warns(UserWarning, match="all cutoffs are ignored"):
        cm.pp.select_hvgs(lognorm(adata), flavor="seurat", n_top_genes=10, min_mean=0.5, inplace=False)


def test_batch_too_small_for_loess_is_named():
    adata = counts_with_batches(n_obs=300, n_vars=100)
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[0, adata.obs.columns.get_loc("batch")] = "tiny"
    with pytest.raises(ValueError, match="Batch 'tiny' has 1 cells"):
        cm.pp.select_hvgs(adata, batch_key="batch", n_top_genes=20)


def test_cell_ranger_on_undetected_genes_explains(tmp_path):
    adata = counts_with_batches(n_obs=200, n_vars=100)
    X = adata.X.tolil()
    X[:, :30] = 0
    adata.X = X.tocsr()
    sc.pp.log1p(adata)
    with pytest.raises(ValueError, match="filter_genes"):
        cm.pp.select_hvgs(adata, flavor="cell_ranger", n_top_genes=10)


def test_zarr_path_reads_only_what_it_needs(tmp_path):
    adata = counts_with_batches(n_obs=300, n_vars=120)
    path = as_storage(adata, "path_zarr", tmp_path)
    table = cm.pp.select_hvgs(path, batch_key="batch", n_top_genes=30, inplace=False)
    assert table["highly_variable"].sum() == 30
    assert table.index.equals(adata.var_names)


def test_duplicate_gene_names_are_refused():
    adata = counts_with_batches(n_obs=200, n_vars=100)
    adata.var_names = ["dup" if i in (3, 50) else name for i, name in enumerate(adata.var_names)]
    with pytest.raises(ValueError, match=r"var_names are not unique \(1 duplicated, e.g. \['dup'\]\)"):
        cm.pp.select_hvgs(adata, n_top_genes=20, inplace=False)


def test_backed_view_needs_inplace_false(tmp_path):
    adata = counts_with_batches(n_obs=300, n_vars=100)
    adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    try:
        view = backed[backed.obs["batch"] != "batch_0"]
        with pytest.raises(ValueError, match="view of a backed AnnData"):
            cm.pp.select_hvgs(view, n_top_genes=20)
        expected = sc.pp.highly_variable_genes(
            adata[view.obs_names].copy(), n_top_genes=20, flavor="seurat_v3", inplace=False
        )
        assert_same_table(expected, cm.pp.select_hvgs(view, n_top_genes=20, inplace=False), exact=True)
    finally:
        backed.file.close()


def test_path_with_a_layer_and_no_X(tmp_path):
    adata = counts_with_batches(n_obs=200, n_vars=100)
    stored = ad.AnnData(obs=adata.obs, var=adata.var, layers={"counts": adata.X})
    stored.write_h5ad(tmp_path / "layers_only.h5ad")
    table = cm.pp.select_hvgs(tmp_path / "layers_only.h5ad", layer="counts", n_top_genes=20, inplace=False)
    expected = sc.pp.highly_variable_genes(adata.copy(), n_top_genes=20, flavor="seurat_v3", inplace=False)
    assert_same_table(expected, table, exact=True)
    with pytest.raises(ValueError, match="expected an .h5ad file or a .zarr store"):
        cm.pp.select_hvgs(tmp_path, n_top_genes=20, inplace=False)


def test_seurat_on_counts_says_so():
    adata = counts_with_batches(n_obs=200, n_vars=100)
    adata.X.data[0] = 5000.0  # expm1 overflows float32: these are not log values
    with pytest.raises(ValueError, match="expects log-normalised data"):
        cm.pp.select_hvgs(adata, flavor="seurat", n_top_genes=20, inplace=False)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_duplicate_entries_are_added_up(flavor):
    adata = _data_for(flavor, counts_with_batches(n_obs=300, n_vars=120))
    X = adata.X.tocoo()
    half = X.data / 2  # every value stored as two halves of one (cell, gene) entry
    duplicated = sp.csr_matrix(
        (np.concatenate([half, half]), (np.concatenate([X.row, X.row]), np.concatenate([X.col, X.col]))),
        shape=X.shape,
    )
    duplicated.has_canonical_format = False
    twin = adata.copy()
    twin.X = duplicated
    kwargs = {"flavor": flavor, "n_top_genes": 30, "batch_key": "batch", "check_values": False}
    expected = cm.pp.select_hvgs(adata, inplace=False, **kwargs)
    result = cm.pp.select_hvgs(twin, inplace=False, **kwargs)
    assert set(result.index[result["highly_variable"]]) == set(expected.index[expected["highly_variable"]])
    np.testing.assert_allclose(result["means"], expected["means"], rtol=1e-6)


def test_lazy_anndata_with_a_batch_column(tmp_path):
    pytest.importorskip("dask")
    from anndata.experimental import read_lazy

    adata = lognorm(counts_with_batches(n_obs=300, n_vars=120))
    adata.write_h5ad(tmp_path / "l.h5ad")
    lazy = read_lazy(tmp_path / "l.h5ad")  # obs stays lazy (xarray)
    for flavor in ("seurat", "cell_ranger"):
        expected = sc.pp.highly_variable_genes(
            adata.copy(), flavor=flavor, n_top_genes=30, batch_key="batch", inplace=False
        )
        result = cm.pp.select_hvgs(lazy, flavor=flavor, n_top_genes=30, batch_key="batch", inplace=False)
        assert set(result.index[result["highly_variable"]]) == set(expected.index[expected["highly_variable"]])


def test_key_added_cannot_clobber_statistics_and_float16_works():
    adata = counts_with_batches(n_obs=200, n_vars=100)
    with pytest.raises(ValueError, match="would overwrite a statistics column"):
        cm.pp.select_hvgs(adata, n_top_genes=20, key_added="means")
    half = lognorm(adata)
    half.X = half.X.toarray().astype(np.float16)
    table = cm.pp.select_hvgs(half, flavor="seurat", n_top_genes=20, inplace=False)
    assert table["highly_variable"].sum() == 20
