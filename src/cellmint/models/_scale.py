"""What a matrix of expression values holds, told from the values themselves, and how to undo it.

Shared files come as raw counts or as counts scaled per cell and log-transformed: ``log1p`` of
counts per 10,000 (scanpy's default), of counts per million, of counts over the median library or
over scran/DESeq size factors, ``log2(x + 1)`` (scater's ``logcounts``), ``log10(x + 1)``, or scaled
without a log. All of these are ``log_b(c_i · x + 1)`` for some base ``b`` and per-cell factor
``c_i``, and they share a property that identifies them: undo the log with the right base
(``u = b^v - 1``) and every value of a cell is a whole multiple of the cell's smallest value (the
gene seen once), because ``u = c_i · x`` with ``x`` integer. With a wrong base the ratios are not
whole numbers (on PBMC 3k: 100% of a cell's distinct values are whole multiples with the right base,
at most 15% with a wrong one; ``float16`` storage keeps it). The per-cell factor and the constant
row sum need not be known:

- for a model's input only the proportions ``u / Σu`` matter, and they equal ``x / Σx``;
- for training, the counts themselves come back as ``u / min(u)``, rounded (the smallest value of a
  cell is one count in practice), so count-space augmentation works on log-normalised references.

Values that are non-negative but fit no such pattern (e.g. residuals of a variance-stabilising
model, TPM) are ``"unrecognised"``: they can only be used as they are, by models trained on the
same kind of values. Negative values (``sc.pp.scale``, batch-corrected values), NaN and infinity
are errors that name the cell.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from .._utils._values import NEGATIVE, NONFINITE, OK, first_problem

#: bases of the log transforms recognised, tried in this order ("none": scaled, not log-transformed)
BASES = {"e": math.e, "2": 2.0, "10": 10.0, "none": None}
#: cells sampled to tell what a matrix holds
SAMPLE_CELLS = 1000
#: only ratios up to this are checked for being whole numbers (they are most values, and the ones
#: stored precisely enough: float16 keeps about 3 significant digits)
MAX_RATIO = 10.0
#: a ratio is a whole number when it is this close to one
RATIO_TOLERANCE = 0.05
#: share of whole-number ratios from which a base is accepted (right base: ≥ 0.99; wrong: ≤ 0.2, or
#: 0.80 for log10 on log2 data, which the better-scoring right base wins)
MIN_EVIDENCE = 0.9
#: unrecognised non-integers above this cannot be log-normalised expression (log1p(1e4) ≈ 9.2 is
#: the log of a whole library in one gene)
UNRECOGNISED_MAX = 15.0

_DESCRIPTION = {
    "e": "log1p (natural log) of counts scaled per cell",
    "2": "log2(x + 1) of counts scaled per cell",
    "10": "log10(x + 1) of counts scaled per cell",
    "none": "counts scaled per cell, not log-transformed",
}


@dataclass(frozen=True)
class InputScale:
    """What a matrix holds: ``kind`` is ``"counts"``, ``"log"`` (with ``base``) or ``"unrecognised"``.

    ``evidence`` is the share of the sampled cells' distinct values (ratios to the cell's smallest,
    up to :data:`MAX_RATIO`) that are whole numbers after undoing the transform.
    """

    kind: str
    base: str | None = None
    evidence: float = 1.0

    @property
    def recoverable(self) -> bool:
        """Whether proportions of counts (and counts, up to a factor per cell) can be recovered."""
        return self.kind in ("counts", "log")

    def describe(self) -> str:
        if self.kind == "counts":
            return "raw counts"
        if self.kind == "log":
            return _DESCRIPTION[self.base]
        return "non-negative values of an unrecognised scale (not counts, not a log of scaled counts)"

    def to_dict(self) -> dict:
        return {**asdict(self), "base": self.base or "", "description": self.describe()}

    def linear(self, values: np.ndarray) -> np.ndarray:
        """Stored values back on the linear scale (``b^v - 1``); counts and unrecognised values unchanged."""
        if self.kind != "log" or self.base == "none":
            return values
        values = np.asarray(values, dtype=np.float64)
        return np.expm1(values) if self.base == "e" else np.power(BASES[self.base], values) - 1.0

    def to_linear(self, X: np.ndarray | sp.csr_matrix) -> np.ndarray | sp.csr_matrix:
        """A block of cells on the linear scale (a new matrix; zeros stay zeros), float64 for log scales."""
        if self.kind != "log":
            return X
        if sp.issparse(X):
            out = sp.csr_matrix((self.linear(X.data), X.indices, X.indptr), shape=X.shape)
            return out
        return self.linear(X)


def _stored_values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _distinct_per_cell(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's distinct positive values, ascending, and their cells (cells with fewer than two left out)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    keep = X.data > 0
    rows, values = rows[keep], X.data[keep]
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    new = np.ones(len(values), dtype=bool)
    new[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    rows, values = rows[new], values[new]
    counts = np.bincount(rows, minlength=X.shape[0])
    several = np.repeat(counts >= 2, counts)
    return values[several], rows[several]


def _whole_share(values: np.ndarray, rows: np.ndarray, linear) -> float:
    """Share of the distinct values of each cell that are whole multiples of the cell's smallest one."""
    if len(values) == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # a wrong base on unlogged values overflows: it scores 0
        values = linear(values)
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    smallest = values[first][np.cumsum(first) - 1]
    with np.errstate(over="ignore", invalid="ignore"):
        ratio = (values / smallest)[~first]
        ratio = ratio[ratio <= MAX_RATIO]
    return float(np.mean(np.abs(ratio - np.rint(ratio)) <= RATIO_TOLERANCE)) if len(ratio) else 0.0


def detect_scale(X: np.ndarray | sp.spmatrix, *, where: str, names=None, start: int = 0,
                 positions: np.ndarray | None = None) -> InputScale:  # fmt: skip
    """What the first :data:`SAMPLE_CELLS` cells of ``X`` (all genes) hold; errors for values never expression.

    ``where`` names the matrix in messages (``"adata.X"``), ``names`` the cells (obs names of rows
    ``start ..``; of ``positions[start ..]`` for a subset of rows).
    """
    X = X[:SAMPLE_CELLS]
    check_values(X, where=where, names=names, start=start, counts=False, positions=positions)
    values = _stored_values(X)
    nonzero = values[values != 0]
    if nonzero.size == 0:
        raise ValueError(f"{where} holds no non-zero values in the {X.shape[0]:,} cells sampled: cannot tell counts "
                         "from log-values (is the matrix empty?).")  # fmt: skip
    if np.all(nonzero == np.round(nonzero)):
        return InputScale("counts")
    sample = sp.csr_matrix(X, dtype=np.float64)
    values, rows = _distinct_per_cell(sample)
    scores = {base: _whole_share(values, rows, InputScale("log", base).linear) for base in BASES}
    base = max(scores, key=scores.get)
    if scores[base] >= MIN_EVIDENCE:
        return InputScale("log", base, round(float(scores[base]), 4))
    if nonzero.max() > UNRECOGNISED_MAX:
        raise ValueError(
            f"{where} has non-integer values up to {nonzero.max():g} that are neither raw counts nor a log of counts "
            f"scaled per cell (log1p, log2(x + 1), log10(x + 1)), and too large for log-normalised expression. Pass "
            "raw counts or log-normalised values with `layer=` (e.g. the counts in adata.layers or adata.raw)."
        )
    return InputScale("unrecognised", None, round(float(scores[base]), 4))


def check_values(X: np.ndarray | sp.spmatrix, *, where: str, names=None, start: int = 0, counts: bool,
                 positions: np.ndarray | None = None) -> None:  # fmt: skip
    """Raise a ValueError naming the first cell with NaN/inf, a negative value, or (``counts``) a non-integer.

    ``positions``: the rows of the matrix that rows ``start ..`` of ``X`` are (a subset read), to name them.
    """
    values = _stored_values(X)
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{where} holds values of dtype {values.dtype}, not numbers.")
    if values.size == 0 or values.dtype.kind == "b":
        return
    if values.dtype.kind in "iu":
        if values.dtype.kind == "u" or values.min() >= 0:
            return
        position, problem = int(np.argmax(values < 0)), NEGATIVE
    else:
        scan = values.astype(np.float32) if values.dtype == np.float16 else values  # numba has no float16
        problem, position = first_problem(np.ascontiguousarray(scan), counts, True)
        if problem == OK:
            return
    row = int(np.searchsorted(X.indptr, position, side="right") - 1) if sp.issparse(X) else position // X.shape[1]
    row = start + row if positions is None else int(positions[start + row])
    cell = f"cell {names[row]!r} (row {row})" if names is not None else f"row {row}"
    value = values[position]
    if problem == NONFINITE:
        raise ValueError(f"{where} contains NaN or infinite values ({value} in {cell}); fix or remove those cells.")
    if problem == NEGATIVE:
        raise ValueError(
            f"{where} has negative values ({value:g} in {cell}): expression values are never negative. These look "
            "z-scored (sc.pp.scale) or batch-corrected; pass raw counts or log-normalised values instead (e.g. with "
            "`layer=`, or adata.raw.to_adata())."
        )
    raise ValueError(f"{where} was taken for raw counts, but has a non-integer value ({value:g} in {cell}); counts "
                     "and log-values mixed in one matrix cannot be used.")  # fmt: skip


def recover_counts(X: sp.csr_matrix, scale: InputScale) -> sp.csr_matrix:
    """Counts of a block of cells of a recognised log scale: ``b^v - 1`` over each cell's smallest value, rounded.

    Exact when a cell's smallest value is one count (a cell where it is two counts comes back at
    half its depth, with the same proportions up to rounding).
    """
    if scale.kind == "counts":
        return X
    linear = scale.to_linear(sp.csr_matrix(X))
    linear.data = linear.data.astype(np.float64)
    lengths = np.diff(linear.indptr)
    smallest = np.zeros(linear.shape[0])
    nonempty = lengths > 0
    if linear.nnz:
        positive = np.where(linear.data > 0, linear.data, np.inf)
        smallest[nonempty] = np.minimum.reduceat(positive, linear.indptr[:-1][nonempty])
    smallest[~np.isfinite(smallest) | (smallest <= 0)] = 1.0
    linear.data = np.rint(linear.data / np.repeat(smallest, lengths))
    linear.eliminate_zeros()
    return linear


#: log-normalised values above this are implausible (log1p(1e4 · 1) ≈ 9.2 is a cell's whole library)
LOGNORM_MAX = 15.0


def detect_kind(values: np.ndarray, *, where: str) -> str:
    """``"counts"`` or ``"lognorm"`` from a sample of stored values (non-zeros of some cells).

    Raises a ValueError naming what was found when the values fit neither (negative, NaN, or
    non-integers too large to be log-normalised).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError(f"{where} holds no non-zero values in the cells sampled: cannot tell counts from log-values.")
    if not np.isfinite(values).all():
        raise ValueError(f"{where} contains NaN or infinite values.")
    if values.min() < 0:
        raise ValueError(f"{where} has negative values (e.g. {values.min():g}): neither raw counts nor "
                         "log-normalised expression. Pass the counts with `layer=`.")  # fmt: skip
    if np.all(values == np.round(values)):
        return "counts"
    if values.max() <= LOGNORM_MAX:
        return "lognorm"
    raise ValueError(
        f"{where} has non-integer values up to {values.max():g}: too large for log-normalised expression "
        f"(≤ {LOGNORM_MAX:g}) and not counts. Pass raw counts or log1p-normalised values with `layer=`."
    )
