"""Per-batch gene statistics in row chunks, with scanpy's floating-point arithmetic reproduced exactly.

scanpy computes gene means and variances on an in-memory matrix; to get *the same ranks*, not just
close numbers, the chunked sums must be added in the same order and precision as scanpy's kernels
(ties between genes are broken by ``argsort`` on the values, so one ulp can reorder them):

- CSR (in memory, backed, zarr): scanpy's numba kernel gives row ``r`` to partial sum ``r % T``
  (``T = numba.get_num_threads()``), squares each value in the matrix dtype and adds the partials
  in order. We keep the same ``T`` partials per batch and count each batch's own rows.
- CSC (in memory): scanpy walks each column in row order with float64 squares: one partial.
- dense: numpy's column sums run over rows in order, squares in the matrix dtype: one partial.

The second seurat_v3 pass (values clipped at a per-gene maximum) is a single ordered float64 sum
for every layout, as in scanpy. Dask arrays are reduced block by block through dask (so a cluster
scales them); their sums equal the in-memory ones up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from .._utils._chunks import RowChunk, iter_row_chunks, open_matrix


@dataclass
class Arithmetic:
    """How scanpy adds up one layout: number of interleaved partial sums and precision of squares."""

    partitions: int
    square_in_float64: bool


def arithmetic_for(data, layer: str | None) -> Arithmetic:
    """The summation scheme scanpy uses for the matrix behind ``data`` (see module docstring)."""
    with open_matrix(data, layer=layer) as source:
        storage = source.storage
    if storage == "csc":
        return Arithmetic(partitions=1, square_in_float64=True)
    if storage == "csr":
        return Arithmetic(partitions=max(1, numba.get_num_threads()), square_in_float64=False)
    return Arithmetic(partitions=1, square_in_float64=False)


@dataclass
class Moments:
    """Σx, Σx² and detected-cell counts per batch (row ``n_batches`` holds all cells)."""

    n_cells: np.ndarray  # (n_batches + 1,)
    sums: np.ndarray  # (n_batches + 1, n_genes)
    squares: np.ndarray  # (n_batches + 1, n_genes)
    n_detected: np.ndarray  # (n_batches + 1, n_genes) cells with a value > 0

    def mean_var(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance of batch ``b`` (``-1``: all cells), as scanpy's ``_get_mean_var``."""
        n = self.n_cells[b]
        mean = self.sums[b] / n
        var = self.squares[b] / n - mean**2
        if n != 1:
            var *= n / (n - 1)
        return mean, var


@numba.njit(nogil=True, cache=True)
def _moments_csr(data, indices, indptr, batch, seen, sums, squares, detected, square_f64):
    n_all = sums.shape[0] - 1
    n_part = sums.shape[1]
    for r in range(len(indptr) - 1):
        b = batch[r]
        part_b = seen[b] % n_part
        part_all = seen[n_all] % n_part
        seen[b] += 1
        seen[n_all] += 1
        for j in range(indptr[r], indptr[r + 1]):
            g = indices[j]
            value = data[j]
            square = np.float64(value) * np.float64(value) if square_f64 else value * value
            sums[b, part_b, g] += value
            squares[b, part_b, g] += square
            sums[n_all, part_all, g] += value
            squares[n_all, part_all, g] += square
            if value > 0:
                detected[b, g] += 1
                detected[n_all, g] += 1


@numba.njit(nogil=True, cache=True)
def _moments_dense(X, batch, seen, sums, squares, detected):
    n_all = sums.shape[0] - 1
    for r in range(X.shape[0]):
        b = batch[r]
        seen[b] += 1
        seen[n_all] += 1
        for g in range(X.shape[1]):
            value = X[r, g]
            square = value * value
            sums[b, 0, g] += value
            squares[b, 0, g] += square
            sums[n_all, 0, g] += value
            squares[n_all, 0, g] += square
            if value > 0:
                detected[b, g] += 1
                detected[n_all, g] += 1


@numba.njit(nogil=True, cache=True)
def _clipped_csr(data, indices, indptr, batch, clip, sums, squares):
    for r in range(len(indptr) - 1):
        b = batch[r]
        for j in range(indptr[r], indptr[r + 1]):
            g = indices[j]
            value = min(np.float64(data[j]), clip[b, g])
            sums[b, g] += value
            squares[b, g] += value**2


@numba.njit(nogil=True, cache=True)
def _clipped_dense(X, batch, clip, sums, squares):
    for r in range(X.shape[0]):
        b = batch[r]
        for g in range(X.shape[1]):
            value = min(np.float64(X[r, g]), clip[b, g])
            sums[b, g] += value
            squares[b, g] += value**2


ChunkCheck = Callable[[RowChunk], None]
Transform = Callable[[np.ndarray], np.ndarray]


def _prepared(chunk: RowChunk, transform: Transform | None, check: ChunkCheck | None):
    if check is not None:
        check(chunk)
    X = chunk.X
    if transform is not None:
        if sp.issparse(X):
            X = X.copy()
            X.data = transform(X.data)
        else:
            X = transform(np.array(X))
    if sp.issparse(X):
        X.sort_indices()  # canonical order, as scanpy's in-memory matrices
    return X


def moments(
    data,
    batch: np.ndarray,
    n_batches: int,
    *,
    layer: str | None,
    chunk_size: int | None,
    arithmetic: Arithmetic,
    transform: Transform | None = None,
    check: ChunkCheck | None = None,
    progress: bool | None = None,
) -> Moments:
    """First pass: per-batch Σx, Σx² and detected cells, chunk by chunk (see module docstring)."""
    if _is_dask_matrix(data, layer):
        return _moments_dask(data, batch, n_batches, layer=layer, transform=transform, check=check)
    n_genes = _n_genes(data, layer)
    shape = (n_batches + 1, arithmetic.partitions, n_genes)
    sums, squares = np.zeros(shape), np.zeros(shape)
    detected = np.zeros((n_batches + 1, n_genes), dtype=np.int64)
    seen = np.zeros(n_batches + 1, dtype=np.int64)
    for chunk in iter_row_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress, desc="gene moments"):
        X = _prepared(chunk, transform, check)
        codes = batch[chunk.start : chunk.stop]
        if sp.issparse(X):
            _moments_csr(
                X.data, X.indices, X.indptr, codes, seen, sums, squares, detected, arithmetic.square_in_float64
            )
        else:
            if arithmetic.partitions != 1:
                raise AssertionError("dense chunks are summed with one partial")  # pragma: no cover
            _moments_dense(np.ascontiguousarray(X), codes, seen, sums, squares, detected)
    return Moments(
        n_cells=seen,
        sums=_add_partials(sums),
        squares=_add_partials(squares),
        n_detected=detected,
    )


def _add_partials(parts: np.ndarray) -> np.ndarray:
    # scanpy adds its per-thread partials in order, starting from the first
    total = parts[:, 0, :].copy()
    for t in range(1, parts.shape[1]):
        total += parts[:, t, :]
    return total


def clipped_sums(
    data,
    batch: np.ndarray,
    clip: np.ndarray,
    *,
    layer: str | None,
    chunk_size: int | None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Second seurat_v3 pass: Σ min(x, clip) and Σ min(x, clip)² per batch, as ordered float64 sums."""
    if _is_dask_matrix(data, layer):
        return _clipped_dask(data, batch, clip, layer=layer)
    sums, squares = np.zeros(clip.shape), np.zeros(clip.shape)
    for chunk in iter_row_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress, desc="clipped sums"):
        X = _prepared(chunk, None, None)
        codes = batch[chunk.start : chunk.stop]
        if sp.issparse(X):
            _clipped_csr(X.data, X.indices, X.indptr, codes, clip, sums, squares)
        else:
            _clipped_dense(np.ascontiguousarray(X), codes, clip, sums, squares)
    return sums, squares


# ---------------------------------------------------------------------------------------------
# dask: one task per row block, partial sums added on the client


def _dask_matrix(data, layer):
    X = data.X if layer is None else data.layers[layer]
    return X


def _is_dask_matrix(data, layer) -> bool:
    if not hasattr(data, "isbacked"):  # paths and bare matrices go through the chunk reader
        return False
    X = _dask_matrix(data, layer)
    return type(X).__module__.split(".")[0] == "dask"


def _n_genes(data, layer) -> int:
    with open_matrix(data, layer=layer) as source:
        return source.shape[1]


def _block_moments(X, codes, n_batches, transform, check, start):
    X = _prepared(RowChunk(start, start + X.shape[0], X), transform, check)
    n_genes = X.shape[1]
    sums, squares = np.zeros((n_batches + 1, 1, n_genes)), np.zeros((n_batches + 1, 1, n_genes))
    detected = np.zeros((n_batches + 1, n_genes), dtype=np.int64)
    seen = np.zeros(n_batches + 1, dtype=np.int64)
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        _moments_csr(X.data, X.indices, X.indptr, codes, seen, sums, squares, detected, False)
    else:
        _moments_dense(np.ascontiguousarray(X), codes, seen, sums, squares, detected)
    return seen, sums[:, 0], squares[:, 0], detected


def _row_blocks(data, layer):
    X = _dask_matrix(data, layer).rechunk({1: -1})
    starts = np.concatenate([[0], np.cumsum(X.chunks[0])])
    return X.to_delayed().ravel(), starts


def _moments_dask(data, batch, n_batches, *, layer, transform, check) -> Moments:
    import dask

    blocks, starts = _row_blocks(data, layer)
    tasks = [
        dask.delayed(_block_moments)(block, batch[starts[i] : starts[i + 1]], n_batches, transform, check, starts[i])
        for i, block in enumerate(blocks)
    ]
    parts = dask.compute(*tasks)
    return Moments(
        n_cells=sum(p[0] for p in parts),
        sums=sum(p[1] for p in parts),
        squares=sum(p[2] for p in parts),
        n_detected=sum(p[3] for p in parts),
    )


def _block_clipped(X, codes, clip):
    sums, squares = np.zeros(clip.shape), np.zeros(clip.shape)
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        _clipped_csr(X.data, X.indices, X.indptr, codes, clip, sums, squares)
    else:
        _clipped_dense(np.ascontiguousarray(X), codes, clip, sums, squares)
    return sums, squares


def _clipped_dask(data, batch, clip, *, layer):
    import dask

    blocks, starts = _row_blocks(data, layer)
    tasks = [
        dask.delayed(_block_clipped)(block, batch[starts[i] : starts[i + 1]], clip) for i, block in enumerate(blocks)
    ]
    parts = dask.compute(*tasks)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)
