"""numpy's pairwise summation, replayed in a stream: the same additions, value by value, in row chunks.

``np.sum`` of a contiguous float array, and ``np.add.reduceat`` (scipy's per-column sums of a CSC
matrix) after its first value, add ``n`` values as a tree: leaves of at most 128 values summed
with 8 interleaved accumulators, halves split at a multiple of 8. The tree depends only on ``n``,
so when ``n`` is known (counted in an earlier pass) each value can be added, as it arrives, exactly
where numpy would add it: a stream keeps its leaf's accumulators and a stack of finished left
subtrees. ``pearson_residuals`` uses this for the few gene sums that exact totals cannot stand in
for (non-integer values, or float32 totals above ``2**24``).
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from ._hvg_stats import _gene_range, prepared_chunks

#: numpy's pairwise summation: leaves of at most this many values, added with 8 accumulators
_PAIRWISE_BLOCK = 128
#: integer state of a stream: values seen, pairwise length, position, current leaf, stack depth
_SEEN, _LENGTH, _POS, _LEAF_START, _LEAF_LEN, _RIGHTS, _DEPTH = range(7)
#: value state: 8 accumulators, the leaf's total, reduceat's first value, then the stack of open subtrees
_LEAF, _FIRST, _STACK = 8, 9, 10
_MAX_DEPTH = 64


@numba.njit(nogil=True, cache=True)
def _leaf_at(length, k):
    """The leaf of numpy's pairwise tree over ``length`` values that starts at ``k``.

    Also how many right turns end the path to it: the subtrees it completes.
    """
    start, rights = 0, 0
    while length > _PAIRWISE_BLOCK:
        half = length // 2
        half -= half % 8
        if k < start + half:
            length, rights = half, 0
        else:
            start, length, rights = start + half, length - half, rights + 1
    return start, length, rights


@numba.njit(nogil=True, cache=True)
def _start_leaf(ints, vals, s, k):
    start, length, rights = _leaf_at(ints[s, _LENGTH], k)
    ints[s, _LEAF_START], ints[s, _LEAF_LEN], ints[s, _RIGHTS] = start, length, rights
    if length < 8:
        vals[s, 0] = -0.0


@numba.njit(nogil=True, cache=True)
def _push(ints, vals, s, value, reduceat):
    """Add the next value of stream ``s`` exactly where numpy's pairwise summation adds it."""
    if reduceat and ints[s, _SEEN] == 0:  # np.add.reduceat starts from the first value, then adds the rest pairwise
        ints[s, _SEEN] = 1
        vals[s, _FIRST] = value
        return
    ints[s, _SEEN] += 1
    k, start, length = ints[s, _POS], ints[s, _LEAF_START], ints[s, _LEAF_LEN]
    o = k - start
    if length < 8:
        vals[s, 0] += value
    else:
        body = length - length % 8
        if o < 8:
            vals[s, o] = value
        elif o < body:
            vals[s, o % 8] += value
        else:
            vals[s, _LEAF] += value
        if o == body - 1:
            vals[s, _LEAF] = ((vals[s, 0] + vals[s, 1]) + (vals[s, 2] + vals[s, 3])) + (
                (vals[s, 4] + vals[s, 5]) + (vals[s, 6] + vals[s, 7])
            )
    k += 1
    ints[s, _POS] = k
    if k == start + length:  # leaf done: close every subtree it completes, left + right
        total = vals[s, 0] if length < 8 else vals[s, _LEAF]
        depth = ints[s, _DEPTH]
        for _ in range(ints[s, _RIGHTS]):
            depth -= 1
            total = vals[s, _STACK + depth] + total
        vals[s, _STACK + depth] = total
        ints[s, _DEPTH] = depth + 1
        if k < ints[s, _LENGTH]:
            _start_leaf(ints, vals, s, k)


@numba.njit(parallel=True, nogil=True, cache=True)
def _replay_csr(data, indices, indptr, codes, stream, ints, vals, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, stream.shape[1])
        for r in range(len(indptr) - 1):
            b = codes[r]
            for j in range(indptr[r], indptr[r + 1]):
                g = indices[j]
                if g < lo or g >= hi or data[j] == 0:
                    continue
                s = stream[b, g]
                if s >= 0:
                    _push(ints, vals, s, data[j], True)


@numba.njit(parallel=True, nogil=True, cache=True)
def _replay_dense(X, codes, stream, ints, vals, n_threads):
    for t in numba.prange(n_threads):
        lo, hi = _gene_range(t, n_threads, stream.shape[1])
        for r in range(X.shape[0]):
            b = codes[r]
            for g in range(lo, hi):
                s = stream[b, g]
                if s >= 0:
                    _push(ints, vals, s, np.float64(X[r, g]), False)


def replay_sums(data, codes: np.ndarray, replay: np.ndarray, lengths: np.ndarray, dtype: np.dtype, *,
                reduceat: bool, **read) -> np.ndarray:  # fmt: skip
    """Numpy's sums of the (batch, gene) columns marked in ``replay``, in ``dtype``, in one pass over ``data``.

    ``lengths`` gives each marked column's number of values (in the order of ``np.nonzero(replay)``).
    ``reduceat``: the column's stored values != 0 as ``np.add.reduceat`` adds them (sparse);
    otherwise every cell's value as ``np.sum`` does (dense).
    """
    stream = np.full(replay.shape, -1, dtype=np.int64)
    stream[replay] = np.arange(int(replay.sum()))
    ints = np.zeros((int(replay.sum()), 7), dtype=np.int64)
    vals = np.zeros((len(ints), _STACK + _MAX_DEPTH), dtype=dtype)
    ints[:, _LENGTH] = lengths - 1 if reduceat else lengths  # reduceat starts from the first value
    for s in np.flatnonzero(ints[:, _LENGTH] > 0):
        _start_leaf(ints, vals, s, 0)
    threads = numba.get_num_threads()
    for chunk in prepared_chunks(data, desc="exact gene sums", **read):
        chunk_codes = codes[chunk.start : chunk.stop]
        if sp.issparse(chunk.X):
            _replay_csr(chunk.X.data, chunk.X.indices, chunk.X.indptr, chunk_codes, stream, ints, vals, threads)
        else:
            _replay_dense(np.ascontiguousarray(chunk.X), chunk_codes, stream, ints, vals, threads)
    root = np.where(ints[:, _LENGTH] > 0, vals[:, _STACK], dtype.type(-0.0)).astype(dtype)
    return vals[:, _FIRST] + root if reduceat else root
