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

FLAVORS = ["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger", "pearson_residuals"]
COUNT_FLAVORS = ["seurat_v3", "seurat_v3_paper", "pearson_residuals"]
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


def scanpy_hvg(adata, **kwargs):
    """scanpy's answer: pearson_residuals lives in sc.experimental.pp."""
    if kwargs.get("flavor") == "pearson_residuals":
        return sc.experimental.pp.highly_variable_genes(adata, **kwargs)
    return sc.pp.highly_variable_genes(adata, **kwargs)


def run_both(adata, data, chunk_size=None, **kwargs):
    expected = scanpy_hvg(adata.copy(), inplace=False, **kwargs)
    result = cm.pp.select_hvgs(data, inplace=False, chunk_size=chunk_size, **kwargs)
    return expected, result


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    """Column dtypes, gene names as "text" whether object or pandas 3's string dtype.

    A file read by anndata >= 0.13 with pandas 3 has string-dtype names where the in-memory object scanpy
    ran on has object ones: scanpy's ``gene_name`` column follows its input's names, as ours does.
    """
    return {column: "text" if pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype) else str(dtype)
            for column, dtype in frame.dtypes.items()}  # fmt: skip


def assert_same_table(expected: pd.DataFrame, result: pd.DataFrame, *, exact: bool) -> None:
    assert list(result.columns) == list(expected.columns)
    assert set(result.index) == set(expected.index)
    result = result.loc[expected.index]  # scanpy sorts some tables by gene name
    assert _dtypes(result) == _dtypes(expected)
    assert set(result.index[result["highly_variable"]]) == set(expected.index[expected["highly_variable"]])
    for column in expected.columns:
        if column == "mean_bin":  # intervals up to scanpy 1.11, their text from 1.12 on
            assert result[column].cat.categories.dtype == expected[column].cat.categories.dtype
            assert (result[column].astype(str) == expected[column].astype(str)).all()
        elif expected[column].dtype.kind == "f":
            if exact:
                np.testing.assert_array_equal(result[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
            else:
                np.testing.assert_allclose(result[column], expected[column], rtol=1e-5, equal_nan=True, err_msg=column)
        else:
            assert (result[column].to_numpy() == expected[column].to_numpy()).all(), column


def _data_for(flavor, counts):
    return counts if flavor in COUNT_FLAVORS else lognorm(counts)


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
    flavor=st.sampled_from(["seurat_v3", "seurat", "pearson_residuals"]),
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
            expected = scanpy_hvg(adata.copy(), inplace=False, **kwargs)
    except (ValueError, ZeroDivisionError, IndexError) as error:
        # Where scanpy cannot answer, cellmint says why. A batch without a single normalised dispersion makes
        # scanpy index an empty array (IndexError); cellmint gives the warning scanpy gives when too few genes
        # have one (seen with seed 2725: seurat, 113 cells in 3 batches).
        allowed = (ValueError, UserWarning) if isinstance(error, IndexError) else ValueError
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(allowed, match=r"."):
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
    with pytest.raises(ValueError, match=r"X has negative values \(e.g. -2 in cells .*\): flavor='.*' expects raw"):
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
    with pytest.raises(ValueError, match=r"var_names holds 1 duplicated gene names \(e.g. \['dup'\]\)"):
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


def test_dask_distributed_cluster_computes_chunks_concurrently_with_the_exact_answer(tmp_path, monkeypatch):
    """A LocalCluster of 2 worker processes computes the row chunks ahead; the client adds them up in row order."""
    pytest.importorskip("distributed")
    from anndata.experimental import read_lazy
    from distributed import Client, LocalCluster

    from cellmint._utils import _chunks
    from cellmint.pp import _hvg_stats

    counts = counts_with_batches(n_obs=2000, n_vars=300)
    counts.write_h5ad(tmp_path / "counts.h5ad")
    logs = lognorm(counts_with_batches(n_obs=2000, n_vars=300, seed=1))
    logs.write_h5ad(tmp_path / "logs.h5ad")
    halves = counts.copy()
    halves.X = halves.X * 0.5  # not integers: the order of additions decides the last bits
    halves.write_h5ad(tmp_path / "halves.h5ad")
    used, summed = [], []
    lookup, on_cluster = _chunks._cluster_client, _hvg_stats._moments_on_cluster
    monkeypatch.setattr(_chunks, "_cluster_client", lambda: used.append(lookup()) or used[-1])
    monkeypatch.setattr(
        _hvg_stats, "_moments_on_cluster", lambda *a, **k: summed.append(on_cluster(*a, **k)) or summed[-1]
    )
    cases = [(counts, "counts", {"flavor": "seurat_v3", "batch_key": "batch"}),
             (counts, "counts", {"flavor": "seurat_v3"}),
             (counts, "counts", {"flavor": "pearson_residuals"}),
             (logs, "logs", {"flavor": "seurat", "batch_key": "batch"}),
             (halves, "halves", {"flavor": "seurat_v3", "check_values": False})]  # fmt: skip
    answers = [cm.pp.select_hvgs(adata, n_top_genes=50, inplace=False, **kwargs) for adata, _, kwargs in cases]
    summed.clear()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        for (adata, name, kwargs), expected in zip(cases, answers, strict=True):
            lazy = read_lazy(tmp_path / f"{name}.h5ad")
            lazy.obs = adata.obs.copy()
            got = cm.pp.select_hvgs(lazy, n_top_genes=50, inplace=False, chunk_size=250, **kwargs)
            assert used[-1] is not None  # the chunks went to the cluster
            assert _dtypes(got) == _dtypes(expected)  # read_lazy's names: pandas 3's string dtype, the same names
            pd.testing.assert_frame_equal(got, expected, check_names=False, check_exact=True, check_dtype=False,
                                          check_index_type=False)  # fmt: skip
    # counts: the first pass was added up by the workers, chunk by chunk (integers: exact in any order),
    # except per-batch moments from scanpy 1.12 on (Welford's recurrence, in row order); pearson_residuals
    # needs more from its first pass; log values and halves are summed in row order
    batches_on_cluster = _hvg_stats.scanpy_version() < (1, 12)
    assert [s is not None for s in summed] == [True] * batches_on_cluster + [True, False]
    used.clear()
    cm.pp.select_hvgs(read_lazy(tmp_path / "counts.h5ad"), n_top_genes=50, inplace=False)
    assert used
    assert all(client is None for client in used)  # without a client, dask's own scheduler computes each chunk


def test_key_added_cannot_clobber_statistics_and_float16_works():
    adata = counts_with_batches(n_obs=200, n_vars=100)
    with pytest.raises(ValueError, match="would overwrite a statistics column"):
        cm.pp.select_hvgs(adata, n_top_genes=20, key_added="means")
    half = lognorm(adata)
    half.X = half.X.toarray().astype(np.float16)
    table = cm.pp.select_hvgs(half, flavor="seurat", n_top_genes=20, inplace=False)
    assert table["highly_variable"].sum() == 20


# ---- pearson_residuals: scanpy's own tests (tests/test_highly_variable_genes.py, 1.11.5), mirrored ----


@pytest.fixture(
    scope="module",
    params=[("dense", "float32"), ("dense", "int64"), ("csr", "float32"), ("csr", "int64")],
    ids=lambda p: "-".join(p),
)
def pbmc3k_small(request, shared_data):
    """scanpy's ``pbmc3k_parametrized_small``: 1,000 cells × the first 500 genes, three random batches."""
    layout, dtype = request.param
    adata = ad.read_h5ad(shared_data / "pbmc3k_raw.h5ad")[:1000, :500].copy()
    sc.pp.filter_cells(adata, min_genes=1)
    adata.obs["batch"] = np.random.RandomState(42).randint(0, 3, size=adata.n_obs)  # scanpy's np.random.seed(42)
    sc.pp.filter_genes(adata, min_cells=1)
    X = adata.X.astype(dtype)
    adata.X = X.toarray() if layout == "dense" else X
    return adata


def check_pearson_columns(df: pd.DataFrame, n_top_genes: int) -> None:
    assert pd.api.types.is_float_dtype(df["residual_variances"].dtype)
    assert df["highly_variable"].to_numpy().dtype is np.dtype("bool")
    assert np.sum(df["highly_variable"]) == n_top_genes
    assert np.nanmax(df["highly_variable_rank"].to_numpy()) <= n_top_genes - 1


@pytest.mark.realdata
def test_pearson_residuals_inputchecks(pbmc3k_small):
    adata = pbmc3k_small.copy()
    if adata.X.dtype == np.float32:
        noninteger = adata.copy()
        rows, cols = noninteger.X.nonzero()
        noninteger.X[rows[0], cols[0]] = 0.5
        # scanpy warns and computes; cellmint refuses unless told to go on, then gives scanpy's answer
        with pytest.raises(ValueError, match=r"'pearson_residuals' expects raw counts, but X has non-integer values"):
            cm.pp.select_hvgs(noninteger, flavor="pearson_residuals", n_top_genes=100, inplace=False)
        kwargs = {"flavor": "pearson_residuals", "n_top_genes": 100, "check_values": False}
        expected, result = run_both(noninteger, noninteger, **kwargs)
        assert_same_table(expected, result, exact=True)
    for theta in [0, -1, np.nan]:
        with pytest.raises(ValueError, match="Pearson residuals require theta > 0"):
            cm.pp.select_hvgs(adata, theta=theta, flavor="pearson_residuals", n_top_genes=100)
    with pytest.raises(ValueError, match=r"Pearson residuals require `clip>=0` or `clip=None`\."):
        cm.pp.select_hvgs(adata, clip=-1, flavor="pearson_residuals", n_top_genes=100)
    assert "highly_variable" not in adata.var.columns  # nothing was written


@pytest.mark.realdata
@pytest.mark.parametrize("subset", [True, False], ids=["subset", "full"])
@pytest.mark.parametrize("clip", [None, np.inf, 30], ids=["noclip", "infclip", "30clip"])
@pytest.mark.parametrize("theta", [100, np.inf], ids=["100theta", "inftheta"])
@pytest.mark.parametrize("n_top_genes", [100, 200], ids=["100n", "200n"])
def test_pearson_residuals_general(pbmc3k_small, subset, clip, theta, n_top_genes):
    adata = pbmc3k_small.copy()
    del adata.var
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": n_top_genes, "clip": clip, "theta": theta}
    # reference 1: the variance of scanpy's Pearson residuals themselves
    residuals = sc.experimental.pp.normalize_pearson_residuals(adata, clip=clip, theta=theta, inplace=False)
    reference = np.var(residuals["X"], axis=0)
    if subset:
        reference = reference[np.argsort(-reference)[:n_top_genes]]
    # reference 2: scanpy's highly variable genes, to the bit
    expected = sc.experimental.pp.highly_variable_genes(adata.copy(), subset=subset, inplace=False, **kwargs)

    output = cm.pp.select_hvgs(adata, subset=subset, inplace=False, **kwargs)
    assert_same_table(expected, output, exact=True)
    assert cm.pp.select_hvgs(adata, subset=subset, inplace=True, **kwargs) is None
    pd.testing.assert_frame_equal(output, adata.var)  # inplace writes the same table, in scanpy's column order
    assert adata.uns["hvg"] == {"flavor": "pearson_residuals", "computed_on": "adata.X"}

    variances = output["residual_variances"].to_numpy()
    np.testing.assert_allclose(np.sort(variances)[::-1] if subset else variances, reference, rtol=1e-5)
    top = np.sort(np.argsort(-variances)[:n_top_genes])
    np.testing.assert_array_equal(np.flatnonzero(output["highly_variable"]), top)
    assert np.nanmin(output["highly_variable_rank"].to_numpy()) == 0
    check_pearson_columns(output, n_top_genes)


@pytest.mark.realdata
@pytest.mark.parametrize("subset", [True, False], ids=["subset", "full"])
@pytest.mark.parametrize("n_top_genes", [100, 200], ids=["100n", "200n"])
def test_pearson_residuals_batch(pbmc3k_small, subset, n_top_genes):
    adata = pbmc3k_small.copy()
    del adata.var
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": n_top_genes, "batch_key": "batch", "subset": subset}
    expected = sc.experimental.pp.highly_variable_genes(adata.copy(), inplace=False, **kwargs)
    output = cm.pp.select_hvgs(adata, inplace=False, **kwargs)
    assert_same_table(expected, output, exact=True)
    cm.pp.select_hvgs(adata, inplace=True, **kwargs)
    pd.testing.assert_frame_equal(output, adata.var)

    check_pearson_columns(output, n_top_genes)
    n_batches = len(np.unique(adata.obs["batch"]))
    intersection = output["highly_variable_intersection"]
    assert intersection.to_numpy().dtype is np.dtype("bool")
    assert 0 < intersection.sum() <= n_top_genes * n_batches
    assert output["highly_variable"][intersection].all()
    assert pd.api.types.is_float_dtype(output["highly_variable_rank"].dtype)
    assert output["highly_variable_nbatches"].to_numpy().dtype is np.dtype("int")
    assert set(output["highly_variable_nbatches"]) <= {0, 1, 2, 3}


# ---- pearson_residuals: what scanpy's tests do not reach ----


def test_pearson_default_clip_is_the_first_batchs_as_in_scanpy():
    adata = counts_with_batches(n_obs=600, n_vars=150)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) < 50, "a_small", "b_large")  # first batch (sorted): 50 cells
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": 30, "batch_key": "batch", "inplace": False}
    default = cm.pp.select_hvgs(adata, **kwargs)
    assert_same_table(scanpy_hvg(adata.copy(), **kwargs), default, exact=True)
    first = cm.pp.select_hvgs(adata, clip=np.sqrt(50), **kwargs)
    pd.testing.assert_frame_equal(default, first)
    everyone = cm.pp.select_hvgs(adata, clip=np.sqrt(adata.n_obs), **kwargs)
    assert not np.array_equal(default["residual_variances"], everyone["residual_variances"])


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_pearson_non_integer_values_replay_numpys_pairwise_sums(layout):
    adata = counts_with_batches(n_obs=700, n_vars=120)
    if layout == "csr":  # float32 values: scipy adds each gene's values pairwise in float32
        adata.X = adata.X.multiply(np.float32(1.37)).tocsr().astype(np.float32)
        scanpys = np.asarray(adata.X.tocsc().sum(axis=0)).ravel()
        in_order = np.float32(np.asarray(adata.X.astype(np.float64).sum(axis=0)).ravel())
    else:  # float64 values with full mantissas: numpy adds each column pairwise
        adata.X = adata.X.toarray() / 3.0
        scanpys = np.asfortranarray(adata.X).sum(axis=0)
        in_order = np.cumsum(adata.X, axis=0)[-1]
    assert (scanpys != in_order).any()  # the sums of the values in row order would be off by an ulp
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": 40, "check_values": False}
    for batch_key in (None, "batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # scanpy's own non-integer warning
            expected, result = run_both(adata, adata, batch_key=batch_key, chunk_size=64, **kwargs)
        assert_same_table(expected, result, exact=True)


def test_pearson_float32_gene_totals_above_2_24_replay_numpys_pairwise_sums():
    adata = counts_with_batches(n_obs=1200, n_vars=100)
    rng = np.random.default_rng(7)
    X = adata.X.toarray()
    X[:, 4] = rng.integers(20_000, 45_000, adata.n_obs)  # a gene with 3e7 counts: float32 sums round
    adata.X = sp.csr_matrix(X.astype(np.float32))
    column = X[:, 4].astype(np.float32)
    # numpy's pairwise float32 sum (as scipy's reduceat) is not the exact total rounded once
    assert np.add.reduceat(column, [0])[0] != np.float32(column.astype(np.float64).sum())
    expected, result = run_both(adata, adata, flavor="pearson_residuals", n_top_genes=30, chunk_size=100)
    assert_same_table(expected, result, exact=True)


def test_pearson_replayed_sums_equal_numpys_for_every_length():
    from cellmint.pp import _hvg_pearson

    rng = np.random.default_rng(0)
    lengths = [*range(1, 300), 383, 1024, 1031, 4097]  # leaves of 1-128 values, one and several levels of splits
    n_obs = max(lengths) + 1
    cols = [np.sort(rng.choice(n_obs, n, replace=False)) for n in lengths]
    values = [rng.random(n).astype(np.float32) * 50 + np.float32(0.25) for n in lengths]
    X = sp.csc_matrix(
        (np.concatenate(values), np.concatenate(cols), np.cumsum([0, *lengths])), shape=(n_obs, len(lengths))
    ).tocsr()
    codes = np.zeros(n_obs, dtype=np.int64)
    for sparse in (True, False):
        data = X if sparse else X.toarray()
        totals = _hvg_pearson.TotalsPass(codes, 1, len(lengths), np.dtype(np.float32 if sparse else np.float64))
        for chunk in cm._utils._chunks.iter_row_chunks(data, chunk_size=333):
            totals(chunk)
        sums = _hvg_pearson.gene_sums(data, totals.result, codes, totals.result.cell_sums.dtype, sparse=sparse,
                                      layer=None, chunk_size=333, progress=False)  # fmt: skip
        # scanpy's sums: scipy's reduceat over CSC columns (float32), numpy's column sums of a float64 array
        expected = np.asarray(X.tocsc().sum(axis=0)).ravel() if sparse else np.asfortranarray(data, "f8").sum(axis=0)
        np.testing.assert_array_equal(sums[0], expected)


def test_pearson_refuses_cells_without_counts_and_negative_values():
    adata = counts_with_batches(n_obs=300, n_vars=100)
    empty = adata.copy()
    X = empty.X.tolil()
    X[[4, 9], :] = 0
    empty.X = X.tocsr()
    with pytest.raises(ValueError, match=r"Cells without any count: 2 \(e.g. row 4\).*filter_cells"):
        cm.pp.select_hvgs(empty, flavor="pearson_residuals", n_top_genes=20, inplace=False)
    negative = adata.copy()
    negative.X.data[7] = -1.5
    for check_values in (True, False):
        with pytest.raises(ValueError, match="has negative values"):
            cm.pp.select_hvgs(
                negative, flavor="pearson_residuals", n_top_genes=20, check_values=check_values, inplace=False
            )


def test_pearson_inplace_on_a_layer_and_backed(tmp_path):
    adata = counts_with_batches(n_obs=500, n_vars=150)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # X empty: only the layer has counts
    reference = adata.copy()
    sc.experimental.pp.highly_variable_genes(reference, n_top_genes=40, layer="counts", batch_key="batch")
    cm.pp.select_hvgs(adata, flavor="pearson_residuals", n_top_genes=40, layer="counts", batch_key="batch")
    new = [c for c in reference.var.columns if c not in ("program", "program_log2fc")]
    assert list(adata.var.columns[2:]) == new
    pd.testing.assert_frame_equal(adata.var[new], reference.var[new])
    assert adata.uns["hvg"] == reference.uns["hvg"] == {"flavor": "pearson_residuals", "computed_on": "counts"}

    path = tmp_path / "p.h5ad"
    reference.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        view = cm.pp.select_hvgs(backed, flavor="pearson_residuals", n_top_genes=40, layer="counts", subset=True,
                                 batch_key="batch", key_added="pr")  # fmt: skip
        assert view.is_view
        assert list(view.var_names) == list(reference.var_names[reference.var["highly_variable"]])
        np.testing.assert_array_equal(backed.var["pr_rank"], adata.var["highly_variable_rank"])
    finally:
        backed.file.close()


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_pearson_chunk_size_never_changes_the_answer(chunk_size):
    adata = counts_with_batches(n_obs=300, n_vars=200)
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": 50, "batch_key": "batch", "chunk_size": chunk_size}
    expected, chunked = run_both(adata, adata, **kwargs)
    assert_same_table(expected, chunked, exact=True)


def test_pearson_backed_memory_is_bounded_by_the_chunk(tmp_path):
    adata = counts_with_batches(n_obs=20_000, n_vars=1000, seed=5)
    path = tmp_path / "big.h5ad"
    adata.write_h5ad(path)
    matrix_bytes = adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes
    backed = ad.read_h5ad(path, backed="r")
    kwargs = {"flavor": "pearson_residuals", "n_top_genes": 100, "batch_key": "batch", "chunk_size": 500}
    cm.pp.select_hvgs(adata[:300].copy(), inplace=False, **kwargs)  # compile the kernels first
    tracemalloc.start()
    try:
        table = cm.pp.select_hvgs(backed, inplace=False, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        backed.file.close()
    assert table["highly_variable"].sum() == 100
    assert peak < matrix_bytes / 4, (peak, matrix_bytes)


def test_highly_variable_genes_and_cell_sentences_load_no_torch(tmp_path):
    """The tools that need no network run without importing torch (seconds and memory in a fresh process)."""
    import subprocess
    import sys

    path = tmp_path / "cells.h5ad"
    ad.AnnData(sp.random(60, 40, density=0.3, format="csr", random_state=0, dtype=np.float32) * 20).write_h5ad(path)
    code = (
        "import sys, anndata as ad, numpy as np, cellmint as cm\n"
        f"adata = ad.read_h5ad({str(path)!r}); adata.X.data = np.ceil(adata.X.data)\n"
        "cm.pp.select_hvgs(adata, n_top_genes=10, flavor='seurat_v3', inplace=False)\n"
        "cm.pp.select_hvgs(adata, n_top_genes=10, flavor='pearson_residuals', inplace=False)\n"
        "cm.pp.cell_sentences(adata, n_genes=5, copy=True, progress=False)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr
