from __future__ import annotations

import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import make_counts
from cellmint._utils._chunks import TARGET_CHUNK_BYTES, auto_chunk_size, iter_row_chunks, open_matrix


def _assemble(chunks) -> tuple[np.ndarray, list[tuple[int, int]]]:
    blocks, ranges = [], []
    for chunk in chunks:
        ranges.append((chunk.start, chunk.stop))
        blocks.append(chunk.X.toarray() if sp.issparse(chunk.X) else np.asarray(chunk.X))
    return np.vstack(blocks), ranges


def _assert_same_matrix(chunks, expected: sp.csr_matrix, chunk_size: int) -> None:
    dense, ranges = _assemble(chunks)
    n_obs = expected.shape[0]
    assert ranges == [(s, min(n_obs, s + chunk_size)) for s in range(0, n_obs, chunk_size)]
    np.testing.assert_array_equal(dense, expected.toarray())
    # the sums every later statistic is built on
    np.testing.assert_array_equal(dense.sum(axis=1), np.asarray(expected.sum(axis=1)).ravel())
    np.testing.assert_array_equal(dense.sum(axis=0), np.asarray(expected.sum(axis=0)).ravel())


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "coo", "matrix"])
def test_in_memory_matrices(counts, kind):
    X = {
        "csr": counts,
        "csc": counts.tocsc(),
        "dense": counts.toarray(),
        "coo": counts.tocoo(),
        "matrix": np.asmatrix(counts.toarray()),
    }[kind]
    _assert_same_matrix(iter_row_chunks(X, chunk_size=100), counts, 100)


@pytest.mark.parametrize("layer", [None, "dense", "csc"])
def test_in_memory_anndata_and_layers(counts_adata, counts, layer):
    _assert_same_matrix(iter_row_chunks(counts_adata, layer=layer, chunk_size=128), counts, 128)


@pytest.mark.parametrize("layer", [None, "dense"])
def test_backed_h5ad(h5ad_path, counts, layer):
    adata = ad.read_h5ad(h5ad_path, backed="r")
    try:
        _assert_same_matrix(iter_row_chunks(adata, layer=layer, chunk_size=100), counts, 100)
    finally:
        adata.file.close()


@pytest.mark.parametrize("layer", [None, "dense"])
def test_h5ad_path_reads_on_disk_and_closes(h5ad_path, counts, layer):
    _assert_same_matrix(iter_row_chunks(h5ad_path, layer=layer, chunk_size=300), counts, 300)
    with h5py.File(h5ad_path, "r+"):  # would fail if the iterator had left the file open for reading
        pass


def test_h5ad_path_csc_layer_warns_and_is_exact(h5ad_path, counts):
    with pytest.warns(UserWarning, match="stored on disk as CSC"):
        chunks = list(iter_row_chunks(h5ad_path, layer="csc", chunk_size=250))
    _assert_same_matrix(chunks, counts, 250)


@pytest.mark.parametrize("layer", [None, "dense", "csc"])
def test_zarr_path(zarr_path, counts, layer):
    if layer == "csc":
        with pytest.warns(UserWarning, match="CSC"):
            chunks = list(iter_row_chunks(zarr_path, layer=layer, chunk_size=200))
    else:
        chunks = list(iter_row_chunks(zarr_path, layer=layer, chunk_size=200))
    _assert_same_matrix(chunks, counts, 200)


@pytest.mark.parametrize("store", ["h5ad", "zarr"])
def test_dask_backed_anndata(h5ad_path, zarr_path, counts, store):
    pytest.importorskip("dask")
    from anndata.experimental import read_lazy

    if store == "h5ad":
        with h5py.File(h5ad_path, "r") as f:
            adata = read_lazy(f)
            _assert_same_matrix(iter_row_chunks(adata, chunk_size=150), counts, 150)
    else:
        adata = read_lazy(zarr_path)
        _assert_same_matrix(iter_row_chunks(adata, chunk_size=150), counts, 150)


def test_dask_arrays_dense_and_sparse(counts):
    da = pytest.importorskip("dask.array")
    dense = da.from_array(counts.toarray(), chunks=(200, -1))
    _assert_same_matrix(iter_row_chunks(dense, chunk_size=100), counts, 100)
    sparse = dense.map_blocks(sp.csr_matrix, dtype=counts.dtype, meta=sp.csr_matrix((0, 0), dtype=counts.dtype))
    chunks = list(iter_row_chunks(sparse, chunk_size=100))
    assert all(sp.issparse(c.X) and c.X.format == "csr" for c in chunks)
    _assert_same_matrix(chunks, counts, 100)
    # chunk_size=None follows dask's own row chunks
    assert [c.stop - c.start for c in iter_row_chunks(dense)][:2] == [200, 200]


def test_backed_views_read_only_view_rows(h5ad_path, counts):
    adata = ad.read_h5ad(h5ad_path, backed="r")
    rng = np.random.default_rng(0)
    mask = rng.random(counts.shape[0]) < 0.3
    shuffled = rng.permutation(counts.shape[0])[:200]
    genes = np.array([7, 2, 30, 31, 32])
    try:
        _assert_same_matrix(iter_row_chunks(adata[100:420], chunk_size=64), counts[100:420], 64)
        _assert_same_matrix(iter_row_chunks(adata[mask], chunk_size=50), counts[mask], 50)
        _assert_same_matrix(iter_row_chunks(adata[shuffled], chunk_size=33), counts[shuffled], 33)
        _assert_same_matrix(iter_row_chunks(adata[mask, genes], chunk_size=40), counts[mask][:, genes], 40)
        _assert_same_matrix(iter_row_chunks(adata[mask], layer="dense", chunk_size=50), counts[mask], 50)
    finally:
        adata.file.close()


@pytest.mark.parametrize("fmt", ["csr", "dense", "native"])
def test_output_formats(counts_adata, fmt):
    for layer, native_sparse in [(None, True), ("dense", False)]:
        for chunk in iter_row_chunks(counts_adata, layer=layer, chunk_size=500, fmt=fmt):
            sparse = sp.issparse(chunk.X)
            if fmt == "native":
                assert sparse == native_sparse
            else:
                assert sparse == (fmt == "csr")
            if sparse:
                assert chunk.X.format == "csr"


def test_edge_sizes(counts):
    assert [(c.start, c.stop) for c in iter_row_chunks(counts, chunk_size=10_000)] == [(0, counts.shape[0])]
    assert list(iter_row_chunks(sp.csr_matrix((0, 7), dtype=np.float32), chunk_size=3)) == []
    one = list(iter_row_chunks(counts[:1], chunk_size=1))
    assert len(one) == 1
    assert one[0].X.shape == (1, counts.shape[1])


@pytest.mark.parametrize("bad", [0, -3, 1.5, "10", True])
def test_bad_chunk_size(counts, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_row_chunks(counts, chunk_size=bad))


def test_bad_inputs(counts_adata, h5ad_path, tmp_path):
    with pytest.raises(KeyError, match="Layer 'nope' not found; available layers: \\['csc', 'dense'\\]"):
        list(iter_row_chunks(counts_adata, layer="nope"))
    with pytest.raises(KeyError, match="Layer 'nope'"):
        list(iter_row_chunks(h5ad_path, layer="nope"))
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        list(iter_row_chunks(tmp_path / "missing.h5ad"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected an .h5ad file or a .zarr store"):
        list(iter_row_chunks(tmp_path / "table.csv"))
    with pytest.raises(ValueError, match="fmt must be"):
        list(iter_row_chunks(counts_adata, fmt="coo"))
    with pytest.raises(ValueError, match="bare matrix"):
        list(iter_row_chunks(counts_adata.X, layer="dense"))
    with pytest.raises(TypeError, match="unsupported matrix type list"):
        list(iter_row_chunks([[1, 2], [3, 4]]))


def test_corrupted_sparse_file_is_named(counts_adata, tmp_path):
    path = tmp_path / "broken.h5ad"
    counts_adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][:-10]
        del f["X/data"]
        f["X/data"] = data  # ten stored values lost
    with pytest.raises(ValueError, match=r"sparse matrix 'X' is corrupted: indptr ends at \d+ but data has"):
        list(iter_row_chunks(path))


def test_out_of_range_gene_indices_are_named(counts_adata, tmp_path):
    path = tmp_path / "broken.h5ad"
    counts_adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        indices = f["X/indices"][:]
        indices[-1] = 10_000
        f["X/indices"][:] = indices
    with pytest.raises(ValueError, match=r"gene indices outside 0\.\.52"):
        list(iter_row_chunks(path, chunk_size=500))


def test_auto_chunk_size_targets_the_memory_budget(counts):
    with open_matrix(counts) as source:
        assert auto_chunk_size(source) == counts.shape[0]  # small matrix: one chunk

    class Atlas:  # what auto_chunk_size reads of a 2M × 30k source with 1,500 values per cell
        shape = (2_000_000, 30_000)
        dtype = np.dtype(np.float32)
        is_sparse = True
        nnz = 2_000_000 * 1_500

    rows = auto_chunk_size(Atlas())
    rows_dense = auto_chunk_size(Atlas(), fmt="dense")
    assert 0.5 * TARGET_CHUNK_BYTES <= rows * 1_500 * 12 <= TARGET_CHUNK_BYTES
    assert 0.5 * TARGET_CHUNK_BYTES <= rows_dense * 30_000 * 4 <= TARGET_CHUNK_BYTES
    assert rows > rows_dense


def test_backed_iteration_memory_is_bounded_by_chunk(tmp_path):
    X = make_counts(20_000, 2_000, density=0.2, seed=1)
    path = tmp_path / "big.h5ad"
    ad.AnnData(X=X).write_h5ad(path)
    full_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    chunk_bytes = full_bytes / 20  # chunk_size=1000 of 20_000 rows
    tracemalloc.start()
    try:
        total = 0.0
        for chunk in iter_row_chunks(path, chunk_size=1000):
            total += chunk.X.sum(dtype=np.float64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == X.sum(dtype=np.float64)
    # a couple of chunks in flight plus the int64 indptr, far from the whole matrix
    assert peak < 4 * chunk_bytes + 8 * (X.shape[0] + 1), (peak, chunk_bytes)
    assert peak < full_bytes / 4


@settings(max_examples=40, deadline=None)
@given(
    n_obs=st.integers(0, 60),
    n_vars=st.integers(1, 20),
    density=st.floats(0, 1),
    chunk_size=st.integers(1, 70),
    kind=st.sampled_from(["csr", "csc", "dense"]),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_any_chunking(n_obs, n_vars, density, chunk_size, kind, seed):
    X = sp.random(n_obs, n_vars, density=density, format="csr", random_state=seed, dtype=np.float64)
    X.data = np.ceil(X.data * 10)  # integer counts: sums are exact in any order
    matrix = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[kind]
    if n_obs == 0:
        assert list(iter_row_chunks(matrix, chunk_size=chunk_size)) == []
        return
    _assert_same_matrix(iter_row_chunks(matrix, chunk_size=chunk_size, fmt="csr"), X, chunk_size)


def test_real_backed_pbmc3k_matches_in_memory(shared_data):
    path = shared_data / "pbmc3k_raw.h5ad"
    in_memory = ad.read_h5ad(path).X
    backed = ad.read_h5ad(path, backed="r")
    try:
        row_sums = np.concatenate(
            [np.asarray(c.X.sum(axis=1)).ravel() for c in iter_row_chunks(backed, chunk_size=700)]
        )
        gene_sums = sum(np.asarray(c.X.sum(axis=0)).ravel() for c in iter_row_chunks(backed, chunk_size=700))
    finally:
        backed.file.close()
    np.testing.assert_array_equal(row_sums, np.asarray(in_memory.sum(axis=1)).ravel())
    np.testing.assert_allclose(gene_sums, np.asarray(in_memory.sum(axis=0)).ravel(), rtol=1e-6)


@pytest.mark.parametrize("where", ["csr", "csc", "dense", "h5ad"])
def test_rows_reads_a_subset_in_the_given_order(counts_adata, h5ad_path, counts, where):
    rows = np.random.default_rng(1).permutation(counts.shape[0])[:300]
    rows[:3] = [7, 6, 5]  # out of order, and an all-zero cell
    data = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray(), "h5ad": h5ad_path}[where]
    chunks = list(iter_row_chunks(data, rows=rows, chunk_size=64, fmt="csr"))
    assert [(c.start, c.stop) for c in chunks] == [(s, min(300, s + 64)) for s in range(0, 300, 64)]
    np.testing.assert_array_equal(sp.vstack([c.X for c in chunks]).toarray(), counts[rows].toarray())
