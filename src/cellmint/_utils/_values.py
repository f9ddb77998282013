"""Validation of matrix values, one chunk at a time: NaN/inf anywhere, and raw counts where needed.

One numba pass over the stored values finds the first offending value, so a check costs a small
fraction of the statistics it guards, and errors name where the problem is.
"""

from __future__ import annotations

import numba
import numpy as np
import pandas as pd

from ._chunks import RowChunk

#: problem codes shared by the numba checks (here and in the store's ingest kernel)
OK, NONFINITE, NEGATIVE, NONINTEGER = 0, 1, 2, 3


@numba.njit(nogil=True, cache=True)
def first_problem(values, require_counts, require_nonnegative):
    """The first bad value of a flat array: ``(code, position)``, ``(OK, -1)`` when there is none.

    NaN/infinity always, negative values with either flag, non-integers with ``require_counts``.
    The one scan of the value checks (here and in :func:`cellmint.models._scale.check_values`).
    """
    for i in range(values.size):
        v = values[i]
        if not np.isfinite(v):
            return NONFINITE, i
        if (require_counts or require_nonnegative) and v < 0:
            return NEGATIVE, i
        if require_counts and v != np.floor(v):
            return NONINTEGER, i
    return OK, -1


def validate_chunk(chunk: RowChunk, *, where: str, require_counts: bool, expectation: str = "", hint: str = "",
                   require_nonnegative: bool = False) -> None:  # fmt: skip
    """Raise a ValueError naming the first NaN/inf (always) or non-count value (``require_counts``).

    ``where`` names the matrix (``"X"``, ``"layers['counts']"``); ``expectation`` says who needs
    counts (``"flavor='seurat_v3' expects raw counts"``); ``hint`` says what to do instead.
    ``require_nonnegative`` refuses negative values only (non-integers pass).
    """
    X = chunk.X
    values = X.data if hasattr(X, "indptr") else np.asarray(X).ravel()
    if values.dtype.kind not in "fiu":
        raise ValueError(f"{where} holds values of dtype {values.dtype}, not numbers.")
    if values.dtype.kind != "f":
        signed = require_counts or require_nonnegative
        if signed and values.dtype.kind == "i" and values.size and values.min() < 0:
            code, index = NEGATIVE, int(np.argmax(values < 0))
        else:
            return
    else:
        scan = values.astype(np.float32) if values.dtype == np.float16 else values  # numba has no float16
        code, index = first_problem(scan, require_counts, require_nonnegative)
    if code != OK:
        raise value_error(code, values[index], where=where, cells=f"cells {chunk.start}–{chunk.stop - 1}",
                          expectation=expectation, hint=hint)  # fmt: skip


def value_error(code: int, value: float, *, where: str, cells: str, expectation: str = "",
                hint: str = "") -> ValueError:  # fmt: skip
    """The error for problem ``code`` (``NONFINITE``, ``NEGATIVE``, ``NONINTEGER``) found at ``value`` in ``cells``."""
    if code == NONFINITE:
        return ValueError(f"{where} contains NaN or infinite values ({cells}); fix or remove them first.")
    if code == NEGATIVE:  # never expression, whoever reads it: the matrix first, as every reader says it
        why = " ".join(part for part in (f"{expectation}." if expectation else "", hint) if part)
        return ValueError(f"{where} has negative values (e.g. {value:g} in {cells}){': ' + why if why else '.'}")
    return ValueError(f"{expectation}, but {where} has non-integer values (e.g. {value:g} in {cells}). {hint}".strip())


def checked_labels(values: pd.Series, what: str, *, blank_is_missing: bool = True) -> pd.Series:
    """``values`` as strings, or a ValueError naming ``what`` when a cell has no value (NaN, or blank text).

    The one check of every tool that learns from labels, groups or contexts (``build_store``,
    ``train_annotator``, the perturbation tools): a blank label is no label, never a class of its own.
    Other categorical obs columns a store keeps may hold blank text (``blank_is_missing=False``).
    """
    missing = np.array(pd.isna(values), dtype=bool)  # a copy: pandas 3 hands out read-only views
    text = values.astype(object).where(~missing, "").astype(str)
    if blank_is_missing:
        missing |= (text.str.strip() == "").to_numpy()
    if missing.any():
        examples = [str(name) for name in values.index[missing][:3]]
        empty = "NaN or blank" if blank_is_missing else "NaN"
        raise ValueError(f"{what} is empty ({empty}) for {int(missing.sum())} cells (e.g. {examples}); "
                         "fill it or drop those cells.")  # fmt: skip
    return text
