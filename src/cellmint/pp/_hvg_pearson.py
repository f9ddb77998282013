"""The pearson_residuals flavour (Lause et al. 2021): scanpy's ``sc.experimental.pp.highly_variable_genes``.

Within each batch, counts are compared with a negative-binomial offset model: gene ``g`` in cell
``c`` is expected at ``mu = (Σ_c' x_c'g)(Σ_g' x_cg') / Σ x``; the residual
``(x - mu) / sqrt(mu + mu²/theta)``, clipped at ``±clip``, has a variance over the batch's cells
that ranks the genes. scanpy holds the matrix in memory; here three passes over row chunks give
the same numbers, bit for bit:

1. per batch, gene totals and the number of values of each gene, and every cell's total; the
   ``means``/``variances`` columns come from the same pass (:func:`._hvg_stats.moments`);
2. the sum of clipped residuals of each gene over the batch's cells, in row order (scanpy's first
   loop, which gives the mean);
3. the sum of squared deviations from that mean, in row order (scanpy's second loop).

scanpy adds the cell totals one after another in the sums' dtype (``float32`` for sparse
``float32`` counts, ``float64`` for dense), as pass 1 does. It adds the gene totals with numpy's
pairwise summation (``np.add.reduceat`` over sparse columns). For counts every partial sum is an
exact integer while the total is below ``2**24`` (``float32``; ``2**53`` for ``float64``), so
any order gives scanpy's value. Otherwise — non-integer values allowed by ``check_values=False``,
or a ``float32`` gene total above ``2**24`` (a mitochondrial gene over a million cells) — an extra
pass replays numpy's pairwise tree for those genes only (:mod:`._hvg_pairwise`): pass 1 counted
their values, and the tree depends on nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._chunks import RowChunk, open_matrix
from ._hvg_pairwise import replay_sums
from ._hvg_stats import Arithmetic, ChunkCheck, _gene_range, moments, prepared_chunks


def sum_dtype(dtype: np.dtype, *, sparse: bool) -> np.dtype:
    """The dtype scanpy adds a batch's gene and cell totals in: scipy's sum dtype when sparse, else float64."""
    if not sparse:
        return np.dtype(np.float64)
    if dtype.kind == "f":
        return np.dtype(np.float32) if dtype.itemsize < 4 else np.dtype(dtype)  # float16 is read as float32
    return np.dtype(np.uint64) if dtype.kind == "u" else np.dtype(np.int64)


# ---- pass 1: gene and cell totals per batch -------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _gene_totals_csr(data, indices, indptr, codes, n_values, totals, inexact, n_threads):
    n_genes = totals.shape[1]
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, n_genes)
        for r in range(len(indptr) - 1):
            b = codes[r]
            for j in range(indptr[r], indptr[r + 1]):
                g = indices[j]
                if g < lo or g >= hi or data[j] == 0:  # scanpy drops stored zeros (eliminate_zeros)
                    continue
                value = np.float64(data[j])
                n_values[b, g] += 1
                totals[b, g] += value
                if value != np.floor(value):
                    inexact[b, g] = True


@numba.njit(parallel=True, nogil=True, cache=True)
def _gene_totals_dense(X, codes, n_values, totals, inexact, n_threads):
    n_genes = totals.shape[1]
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, n_genes)
        for r in range(X.shape[0]):
            b = codes[r]
            for g in range(lo, hi):
                value = np.float64(X[r, g])
                if value != 0:
                    n_values[b, g] += 1
                    totals[b, g] += value
                    if value != np.floor(value):
                        inexact[b, g] = True


@numba.njit(nogil=True, cache=True)
def _cell_totals_csr(data, indptr, out):
    # scipy's sum over genes (a CSC matrix-vector product): one after another, in the sum dtype
    for r in range(len(indptr) - 1):
        for j in range(indptr[r], indptr[r + 1]):
            out[r] += data[j]


@numba.njit(nogil=True, cache=True)
def _cell_totals_dense(X, out):
    for r in range(X.shape[0]):
        for g in range(X.shape[1]):
            out[r] += np.float64(X[r, g])


@dataclass
class Totals:
    """Pass 1 per batch (batches × genes) and per cell."""

    n_values: np.ndarray  # values != 0 of each gene
    totals: np.ndarray  # float64 sums (exact for counts)
    inexact: np.ndarray  # a non-integer value was seen
    cell_sums: np.ndarray  # (n_obs,) in the sum dtype
    n_cells: np.ndarray  # (n_batches,)


class TotalsPass:
    """Consumer of pass 1's chunks (see :func:`._hvg_stats.moments`'s ``also``)."""

    def __init__(self, codes: np.ndarray, n_batches: int, n_genes: int, dtype: np.dtype):
        self.codes = codes
        self.result = Totals(
            n_values=np.zeros((n_batches, n_genes), dtype=np.int64),
            totals=np.zeros((n_batches, n_genes)),
            inexact=np.zeros((n_batches, n_genes), dtype=bool),
            cell_sums=np.zeros(len(codes), dtype=dtype),
            n_cells=np.bincount(codes, minlength=n_batches).astype(np.int64),
        )

    def __call__(self, chunk: RowChunk) -> None:
        res, X, codes = self.result, chunk.X, self.codes[chunk.start : chunk.stop]
        cells = res.cell_sums[chunk.start : chunk.stop]
        threads = numba.get_num_threads()
        if sp.issparse(X):
            _gene_totals_csr(X.data, X.indices, X.indptr, codes, res.n_values, res.totals, res.inexact, threads)
            _cell_totals_csr(X.data, X.indptr, cells)
        else:
            X = np.ascontiguousarray(X)
            _gene_totals_dense(X, codes, res.n_values, res.totals, res.inexact, threads)
            _cell_totals_dense(X, cells)


# ---- optional pass: numpy's pairwise gene sums (see :mod:`._hvg_pairwise`) -------------------------


def gene_sums(data, totals: Totals, codes: np.ndarray, dtype: np.dtype, *, sparse: bool, **read) -> np.ndarray:
    """Each batch's gene totals as scanpy computes them (batches × genes, in ``dtype``)."""
    if dtype.kind != "f":
        return totals.totals.astype(dtype)  # integer sums are exact
    limit = 2.0 ** (np.finfo(dtype).nmant + 1)  # integers up to here add exactly in any order
    replay = (totals.n_values > 0) & (totals.inexact | (totals.totals >= limit))
    sums = totals.totals.astype(dtype)
    if replay.any():
        # sparse: np.add.reduceat over the gene's values; dense: np.sum over every cell of the batch
        lengths = totals.n_values[replay] if sparse else totals.n_cells[np.nonzero(replay)[0]]
        sums[replay] = replay_sums(data, codes, replay, lengths, dtype, reduceat=sparse, **read)
    return sums


# ---- passes 2 and 3: clipped residuals -----------------------------------------------------------


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _clipped_residual(value, gene_sum, cell_sum, sum_total, theta, clip):
    # scanpy's expression, operation for operation (gene_sum * cell_sum stays in the sum dtype)
    mu = gene_sum * cell_sum / sum_total
    pre_res = (value - mu) / math.sqrt(mu + mu * mu / theta)
    # numba's min(max(pre_res, -clip), clip), spelled out as its two selects
    res = -clip if -clip > pre_res else pre_res
    return clip if clip < res else res


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _add_row(x, cell_sum, gene_sums, sum_total, theta, clip, mean, out, square):
    """Add one cell's residuals (``square``: squared deviations from ``mean``) to ``out``, gene by gene.

    The arguments are one batch's rows cut to one thread's genes: 1-d, from 0, so that LLVM
    vectorises the loop (each gene's sum still adds its cells in order).
    """
    if square:
        for g in range(len(out)):
            diff = _clipped_residual(np.float64(x[g]), gene_sums[g], cell_sum, sum_total, theta, clip) - mean[g]
            out[g] += diff * diff
    else:
        for g in range(len(out)):
            out[g] += _clipped_residual(np.float64(x[g]), gene_sums[g], cell_sum, sum_total, theta, clip)


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _residuals_csr(data, indices, indptr, codes, cell_sums, gene_sums, sum_totals, theta, clip, mean, out, square,
                   row, n_threads):  # fmt: skip
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, out.shape[1])
        for r in range(len(indptr) - 1):
            for j in range(indptr[r], indptr[r + 1]):  # the row, dense, in this thread's genes
                if lo <= indices[j] < hi:
                    row[indices[j]] = data[j]
            b = codes[r]
            _add_row(row[lo:hi], cell_sums[r], gene_sums[b, lo:hi], sum_totals[b], theta, clip, mean[b, lo:hi],
                     out[b, lo:hi], square)  # fmt: skip
            for j in range(indptr[r], indptr[r + 1]):
                if lo <= indices[j] < hi:
                    row[indices[j]] = 0.0


@numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _residuals_dense(X, codes, cell_sums, gene_sums, sum_totals, theta, clip, mean, out, square, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, out.shape[1])
        for r in range(X.shape[0]):
            b = codes[r]
            _add_row(X[r, lo:hi], cell_sums[r], gene_sums[b, lo:hi], sum_totals[b], theta, clip, mean[b, lo:hi],
                     out[b, lo:hi], square)  # fmt: skip


def residual_variances(
    data,
    totals: Totals,
    sums: np.ndarray,
    codes: np.ndarray,
    *,
    theta: float,
    clip: float | None,
    **read,
) -> np.ndarray:
    """Variance of the clipped Pearson residuals of every gene within every batch (batches × genes).

    Genes without counts in a batch get 0 there, as in scanpy.
    """
    expressed = totals.n_values > 0
    # scanpy sums the expressed genes' totals pairwise, in the sum dtype
    sum_totals = np.array([np.float64(np.sum(sums[b][expressed[b]])) for b in range(len(sums))])
    if clip is None:  # scanpy sets the default clip in its first batch and keeps it for the others
        clip = np.sqrt(totals.n_cells[0])
    theta, clip = np.float64(theta), np.float64(clip)
    n_cells = totals.n_cells[:, None]
    zeros = np.zeros(sums.shape)
    sum_res = _residual_pass(data, totals, sums, sum_totals, codes, theta, clip, zeros, square=False, **read)
    mean = sum_res / n_cells
    var = _residual_pass(data, totals, sums, sum_totals, codes, theta, clip, mean, square=True, **read) / n_cells
    var[~expressed] = 0.0
    return var


def _residual_pass(data, totals, sums, sum_totals, codes, theta, clip, mean, *, square, **read) -> np.ndarray:
    out = np.zeros(sums.shape)
    row = np.zeros(sums.shape[1])
    threads = numba.get_num_threads()
    desc = "residual variances" if square else "residual means"
    for chunk in prepared_chunks(data, desc=desc, **read):
        X, chunk_codes = chunk.X, codes[chunk.start : chunk.stop]
        cells = totals.cell_sums[chunk.start : chunk.stop]
        if sp.issparse(X):
            _residuals_csr(X.data, X.indices, X.indptr, chunk_codes, cells, sums, sum_totals, theta, clip, mean, out,
                           square, row, threads)  # fmt: skip
        else:
            _residuals_dense(np.ascontiguousarray(X), chunk_codes, cells, sums, sum_totals, theta, clip, mean, out,
                             square, threads)  # fmt: skip
    return out


# ---- the flavour ---------------------------------------------------------------------------------------


def table(
    data,
    var_names: pd.Index,
    codes: np.ndarray,
    n_batches: int,
    *,
    arithmetic: Arithmetic,
    check: ChunkCheck | None,
    theta: float,
    clip: float | None,
    n_top_genes: int,
    batched: bool,
    **read,
) -> pd.DataFrame:
    """The ``pearson_residuals`` table of scanpy for ``data``, in three (or four) passes over its rows."""
    dtype, sparse = _source_dtype(data, read["layer"])
    dtype = sum_dtype(dtype, sparse=sparse)
    totals = TotalsPass(codes, n_batches, len(var_names), dtype)
    # means and variances over all cells come from the pass that gathers the totals
    all_cells = np.zeros(len(codes), dtype=np.int64)
    stats = moments(data, all_cells, 1, arithmetic=arithmetic, check=check, also=totals, **read)
    empty = totals.result.cell_sums == 0
    if empty.any():
        raise ValueError(
            f"Cells without any count: {int(empty.sum())} (e.g. row {int(np.argmax(empty))}); their Pearson residuals "
            "are undefined (0/0). Remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )
    sums = gene_sums(data, totals.result, codes, dtype, sparse=sparse, **read)
    residual_vars = residual_variances(data, totals.result, sums, codes, theta=theta, clip=clip, **read)
    means, variances = stats.mean_var(-1)
    return _ranked(residual_vars, means, variances, var_names, n_top_genes=n_top_genes, batched=batched)


# ---- ranking ----------------------------------------------------------------------------------------


def _ranked(
    residual_vars: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    var_names: pd.Index,
    *,
    n_top_genes: int,
    batched: bool,
) -> pd.DataFrame:
    """The result table of scanpy: ranks within batches, their median, and the top genes by number of batches."""
    n_batches = residual_vars.shape[0]
    # argsort twice gives ranks; rank 0 is the most variable gene of its batch
    ranks = np.argsort(np.argsort(-residual_vars, axis=1), axis=1).astype(np.float32)
    n_batches_hvg = np.sum((ranks < n_top_genes).astype(int), axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {
            "means": means,
            "variances": variances,
            "residual_variances": np.mean(residual_vars, axis=0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": n_batches_hvg.astype(np.int64),
            "highly_variable_intersection": n_batches_hvg == n_batches,
        },
        index=var_names,
    )
    # most often selected first, ties broken by the median rank (scanpy's order)
    order = df.sort_values(
        ["highly_variable_nbatches", "highly_variable_rank"], ascending=[False, True], na_position="last"
    ).index
    df["highly_variable"] = False
    df.loc[order[:n_top_genes], "highly_variable"] = True
    if not batched:
        df = df.drop(columns=["highly_variable_nbatches", "highly_variable_intersection"])
    return df


def _source_dtype(data, layer: str | None) -> tuple[np.dtype, bool]:
    """The stored dtype and whether the matrix is sparse (dask: its blocks)."""
    with open_matrix(data, layer=layer) as source:
        return np.dtype(source.dtype), bool(source.is_sparse)
