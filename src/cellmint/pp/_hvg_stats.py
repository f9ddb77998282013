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
for every layout, as in scanpy. scanpy >= 1.12 takes seurat_v3's per-batch moments from
``sc.get.aggregate`` (Welford's recurrence); that is reproduced too when that scanpy is installed.
Dask arrays: dask computes each row block (reading, decompressing, lazy steps) and the blocks are
added here in order, so the sums are exact as well. On a ``dask.distributed`` cluster the blocks are
computed ahead, concurrently, by the workers, and the client adds them up in row order. The first
pass goes further when its sums cannot depend on the order of additions: when every value is a
non-negative integer (raw counts, no transform, no Welford recurrence), every partial sum is an
integer, exact in float64 below 2**53, so each worker adds up its own chunk (:func:`_chunk_moments`)
and the client adds the chunks' sums — the same numbers, bit for bit, as scanpy's ordered sums, from
a few vectors per chunk instead of the chunk itself. Values that are not such integers (or sums that
reach 2**53) send that pass back to the ordered accumulation of the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numba
import numpy as np
import scipy.sparse as sp

from .._utils._chunks import RowChunk, iter_row_chunks, map_on_cluster, open_matrix


@dataclass
class Arithmetic:
    """How scanpy adds up one layout: number of interleaved partial sums and precision of squares."""

    partitions: int
    square_in_float64: bool
    #: per-batch mean/variance by Welford's recurrence (scanpy >= 1.12's ``aggregate``), else from sums
    welford_batches: bool = False
    dense: bool = False


def arithmetic_for(data, layer: str | None, *, welford_batches: bool = False) -> Arithmetic:
    """The summation scheme scanpy uses for the matrix behind ``data`` (see module docstring)."""
    with open_matrix(data, layer=layer) as source:
        # dask blocks arrive as CSR or dense and are summed like an in-memory matrix of that kind
        storage = ("csr" if source.is_sparse else "dense") if source.storage == "dask" else source.storage
    if storage == "csc":
        return Arithmetic(partitions=1, square_in_float64=True, welford_batches=welford_batches)
    if storage == "csr":
        threads = max(1, numba.get_num_threads())
        return Arithmetic(partitions=threads, square_in_float64=False, welford_batches=welford_batches)
    return Arithmetic(partitions=1, square_in_float64=False, welford_batches=welford_batches, dense=True)


def scanpy_version() -> tuple[int, int]:
    """(major, minor) of the installed scanpy, whose arithmetic and output types the flavours follow."""
    import re
    from importlib.metadata import version

    major, minor = (int(part) for part in re.findall(r"\d+", version("scanpy"))[:2])
    return major, minor


def scanpy_aggregates_batches() -> bool:
    """Whether the installed scanpy (>= 1.12) takes seurat_v3's per-batch moments from ``sc.get.aggregate``."""
    return scanpy_version() >= (1, 12)


@dataclass
class Moments:
    """Σx, Σx² and detected-cell counts per batch (row ``n_batches`` holds all cells)."""

    n_cells: np.ndarray  # (n_batches + 1,)
    sums: np.ndarray  # (n_batches + 1, n_genes)
    squares: np.ndarray  # (n_batches + 1, n_genes)
    n_detected: np.ndarray  # (n_batches + 1, n_genes) cells with a value > 0
    welford: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # mean, M2, values seen (batches × genes)
    welford_dense: bool = False

    def mean_var(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance of batch ``b`` (``-1``: all cells), as scanpy's ``_get_mean_var``."""
        n = self.n_cells[b]
        mean = self.sums[b] / n
        var = self.squares[b] / n - mean**2
        if n != 1:
            var *= n / (n - 1)
        return mean, var

    def batch_mean_var(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance of batch ``b`` as seurat_v3 gets them from the installed scanpy."""
        if self.welford is None:
            return self.mean_var(b)
        mean, m2, seen = (a[b].copy() for a in self.welford)
        n_obs = self.n_cells[b]
        if not self.welford_dense:  # merge each gene's accumulator with its implicit zeros
            zeros = n_obs - seen
            merge = (zeros > 0) & (seen > 0)
            mean_a = mean[merge]
            mean[merge] = mean_a * seen[merge] / n_obs
            m2[merge] += mean_a * mean_a * seen[merge] * zeros[merge] / n_obs
        var = m2 / n_obs
        var *= n_obs / (n_obs - 1) if n_obs > 1 else np.nan
        return mean, var


# Each kernel splits the genes into one contiguous range per thread: a thread scans every stored
# value of the chunk but adds only its own genes, so every (batch, partial, gene) sum still receives
# its values in row order — the same additions as scanpy's, on both cores.


@numba.njit(nogil=True, cache=True)
def _gene_range(t, n_threads, n_genes):
    return t * n_genes // n_threads, (t + 1) * n_genes // n_threads


@numba.njit(nogil=True, cache=True)
def _partials(batch, seen, n_part):
    """Partial-sum index of every row for its batch and for all cells; advances the row counters."""
    n_all = len(seen) - 1
    part_b = np.empty(len(batch), dtype=np.int64)
    part_all = np.empty(len(batch), dtype=np.int64)
    for r in range(len(batch)):
        b = batch[r]
        part_b[r] = seen[b] % n_part
        part_all[r] = seen[n_all] % n_part
        seen[b] += 1
        seen[n_all] += 1
    return part_b, part_all


@numba.njit(parallel=True, nogil=True, cache=True)
def _moments_csr(
    data, indices, indptr, batch, part_b, part_all, sums, squares, detected, square_f64, with_all, n_threads
):
    n_all, n_genes = sums.shape[0] - 1, sums.shape[2]
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, n_genes)
        for r in range(len(indptr) - 1):
            b, pb, pa = batch[r], part_b[r], part_all[r]
            for j in range(indptr[r], indptr[r + 1]):
                g = indices[j]
                if g < lo or g >= hi:
                    continue
                value = data[j]
                square = np.float64(value) * np.float64(value) if square_f64 else value * value
                sums[b, pb, g] += value
                squares[b, pb, g] += square
                if with_all:
                    sums[n_all, pa, g] += value
                    squares[n_all, pa, g] += square
                if value > 0:
                    detected[b, g] += 1


@numba.njit(parallel=True, nogil=True, cache=True)
def _moments_dense(X, batch, sums, squares, detected, with_all, n_threads):
    n_all, n_genes = sums.shape[0] - 1, X.shape[1]
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, n_genes)
        for r in range(X.shape[0]):
            b = batch[r]
            for g in range(lo, hi):
                value = X[r, g]
                square = value * value
                sums[b, 0, g] += value
                squares[b, 0, g] += square
                if with_all:
                    sums[n_all, 0, g] += value
                    squares[n_all, 0, g] += square
                if value > 0:
                    detected[b, g] += 1


@numba.njit(parallel=True, nogil=True, cache=True)
def _clipped_csr(data, indices, indptr, batch, clip, sums, squares, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, clip.shape[1])
        for r in range(len(indptr) - 1):
            b = batch[r]
            for j in range(indptr[r], indptr[r + 1]):
                g = indices[j]
                if g < lo or g >= hi:
                    continue
                value = min(np.float64(data[j]), clip[b, g])
                sums[b, g] += value
                squares[b, g] += value**2


@numba.njit(parallel=True, nogil=True, cache=True)
def _clipped_dense(X, batch, clip, sums, squares, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, clip.shape[1])
        for r in range(X.shape[0]):
            b = batch[r]
            for g in range(lo, hi):
                value = min(np.float64(X[r, g]), clip[b, g])
                sums[b, g] += value
                squares[b, g] += value**2


@numba.njit(parallel=True, nogil=True, cache=True)
def _welford_csr(data, indices, indptr, batch, mean, m2, seen, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, mean.shape[1])
        for r in range(len(indptr) - 1):
            b = batch[r]
            for j in range(indptr[r], indptr[r + 1]):
                g = indices[j]
                if g < lo or g >= hi:
                    continue
                value = np.float64(data[j])
                n = seen[b, g] + 1
                seen[b, g] = n
                m = mean[b, g]
                delta = value - m
                m += delta / n
                mean[b, g] = m
                m2[b, g] += delta * (value - m)


@numba.njit(parallel=True, nogil=True, cache=True)
def _welford_dense(X, batch, mean, m2, seen, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, mean.shape[1])
        for r in range(X.shape[0]):
            b = batch[r]
            for g in range(lo, hi):
                value = np.float64(X[r, g])
                n = seen[b, g] + 1
                seen[b, g] = n
                delta = value - mean[b, g]
                mean[b, g] += delta / n
                m2[b, g] += delta * (value - mean[b, g])


@numba.njit(nogil=True, cache=True)
def _strictly_increasing_rows(indptr, indices):
    # canonical CSR: sorted gene indices and no duplicate entries (scipy's own check is ~5x slower)
    for r in range(len(indptr) - 1):
        for j in range(indptr[r] + 1, indptr[r + 1]):
            if indices[j] <= indices[j - 1]:
                return False
    return True


ChunkCheck = Callable[[RowChunk], None]
Transform = Callable[[np.ndarray], np.ndarray]


def _prepared(chunk: RowChunk, transform: Transform | None, check: ChunkCheck | None):
    if check is not None:
        check(chunk)
    X = chunk.X  # may share memory with the user's matrix: never modified in place
    if X.dtype == np.float16:  # the kernels have no float16: such values are summed as float32
        X = X.astype(np.float32)
    if transform is not None:
        if sp.issparse(X):
            X = sp.csr_matrix((transform(X.data.copy()), X.indices, X.indptr), shape=X.shape)
        else:
            X = transform(np.array(X))
    if sp.issparse(X) and not _strictly_increasing_rows(X.indptr, X.indices):
        # sorted, with duplicate entries of a cell and gene added up: their sum is the value
        X = X.copy()
        X.sum_duplicates()
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
    also: Callable[[RowChunk], None] | None = None,
) -> Moments:
    """First pass: per-batch Σx, Σx² and detected cells, chunk by chunk (see module docstring).

    ``also`` receives every prepared chunk too, so that a flavour needing more sums than these
    (``pearson_residuals``) gathers them in the same pass.
    """
    if also is None and transform is None and not (arithmetic.welford_batches and n_batches > 1):
        exact = _moments_on_cluster(data, batch, n_batches, layer=layer, chunk_size=chunk_size,
                                    arithmetic=arithmetic, check=check)  # fmt: skip
        if exact is not None:
            return exact
    accumulator = _MomentSums(n_batches, _n_genes(data, layer), arithmetic, with_all=n_batches > 1)
    for chunk in prepared_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress, desc="gene moments",
                                 transform=transform, check=check):  # fmt: skip
        accumulator.add(chunk.X, batch[chunk.start : chunk.stop])
        if also is not None:
            also(chunk)
    return accumulator.result()


#: float64 adds integers exactly while every partial sum stays below this
_EXACT_INTEGERS = 2.0**53


def _chunk_moments(block, start: int, stop: int, *, codes: np.ndarray, n_batches: int, square_in_float64: bool,
                   check: ChunkCheck | None):  # fmt: skip
    """On a worker: a chunk's own Σx, Σx², detected and cell counts; ``None`` unless all values are integers ≥ 0."""
    X = _prepared(RowChunk(start, stop, sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)), None, check)
    values = X.data if sp.issparse(X) else X
    if values.size and (values.min() < 0 or not np.array_equal(values, np.floor(values))):
        return None
    sums = _MomentSums(n_batches, X.shape[1], Arithmetic(partitions=1, square_in_float64=square_in_float64),
                       with_all=n_batches > 1)  # fmt: skip
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # for this thread only: the worker runs one task per thread, each on its own core
    try:
        sums.add(X, codes)
    finally:
        numba.set_num_threads(threads)
    return sums.sums, sums.squares, sums.detected, sums.seen


def _moments_on_cluster(data, batch: np.ndarray, n_batches: int, *, layer, chunk_size, arithmetic: Arithmetic,
                        check: ChunkCheck | None) -> Moments | None:  # fmt: skip
    """The first pass with each chunk added up by the worker that computed it (module docstring), or ``None``."""
    task = partial(_chunk_moments, n_batches=n_batches, square_in_float64=arithmetic.square_in_float64, check=check)
    chunks = map_on_cluster(data, task, layer=layer, chunk_size=chunk_size,
                            per_chunk=lambda start, stop: {"codes": batch[start:stop]})  # fmt: skip
    if chunks is None:
        return None
    total = _MomentSums(n_batches, _n_genes(data, layer), Arithmetic(partitions=1, square_in_float64=False),
                        with_all=n_batches > 1)  # fmt: skip
    for _, _, part in chunks:
        if part is None:
            chunks.close()  # values the order of additions matters for: the blocks are added in order instead
            return None
        for mine, theirs in zip((total.sums, total.squares, total.detected, total.seen), part, strict=True):
            mine += theirs
    if max(total.sums.max(initial=0), total.squares.max(initial=0)) >= _EXACT_INTEGERS:
        return None
    return total.result()


def prepared_chunks(
    data,
    *,
    layer: str | None,
    chunk_size: int | None,
    progress: bool | None,
    desc: str,
    transform: Transform | None = None,
    check: ChunkCheck | None = None,
) -> Iterator[RowChunk]:
    """Row chunks ready for the kernels: checked, transformed, float16 widened, canonical CSR."""
    for chunk in iter_row_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress, desc=desc, prefetch=True):
        yield RowChunk(chunk.start, chunk.stop, _prepared(chunk, transform, check))


class _MomentSums:
    """Running Σx, Σx² (in scanpy's partial sums) and detected counts per batch."""

    def __init__(self, n_batches: int, n_genes: int, arithmetic: Arithmetic, *, with_all: bool):
        shape = (n_batches + 1, arithmetic.partitions, n_genes)
        self.sums, self.squares = np.zeros(shape), np.zeros(shape)
        self.detected = np.zeros((n_batches + 1, n_genes), dtype=np.int64)
        self.seen = np.zeros(n_batches + 1, dtype=np.int64)
        self.arithmetic = arithmetic
        self.with_all = with_all  # with one batch, "all cells" is that batch
        self.welford = None
        if arithmetic.welford_batches and n_batches > 1:
            self.welford = (np.zeros((n_batches, n_genes)), np.zeros((n_batches, n_genes)),
                            np.zeros((n_batches, n_genes), dtype=np.int64))  # fmt: skip

    def add(self, X, codes: np.ndarray) -> None:
        part_b, part_all = _partials(codes, self.seen, self.arithmetic.partitions)
        threads = numba.get_num_threads()
        if sp.issparse(X):
            _moments_csr(
                X.data, X.indices, X.indptr, codes, part_b, part_all, self.sums, self.squares, self.detected,
                self.arithmetic.square_in_float64, self.with_all, threads,
            )  # fmt: skip
        else:
            X = np.ascontiguousarray(X)
            _moments_dense(X, codes, self.sums, self.squares, self.detected, self.with_all, threads)
        if self.welford is not None:
            if sp.issparse(X):
                _welford_csr(X.data, X.indices, X.indptr, codes, *self.welford, threads)
            else:
                _welford_dense(X, codes, *self.welford, threads)

    def result(self) -> Moments:
        sums, squares = _add_partials(self.sums), _add_partials(self.squares)
        if not self.with_all:
            sums[-1], squares[-1] = sums[0], squares[0]
        detected = self.detected.copy()
        detected[-1] = detected[:-1].sum(axis=0)
        return Moments(
            n_cells=self.seen.copy(), sums=sums, squares=squares, n_detected=detected, welford=self.welford,
            welford_dense=self.arithmetic.dense,
        )  # fmt: skip


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
    sums, squares = np.zeros(clip.shape), np.zeros(clip.shape)
    for chunk in prepared_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress, desc="clipped sums"):
        _add_clipped(chunk.X, batch[chunk.start : chunk.stop], clip, sums, squares)
    return sums, squares


def _add_clipped(X, codes, clip, sums, squares) -> None:
    if sp.issparse(X):
        _clipped_csr(X.data, X.indices, X.indptr, codes, clip, sums, squares, numba.get_num_threads())
    else:
        _clipped_dense(np.ascontiguousarray(X), codes, clip, sums, squares, numba.get_num_threads())


def _n_genes(data, layer) -> int:
    with open_matrix(data, layer=layer) as source:
        return source.shape[1]
