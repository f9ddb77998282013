"""Validation of matrix values, one chunk at a time: NaN/inf anywhere, and raw counts where needed.

One numba pass over the stored values finds the first offending value, so a check costs a small
fraction of the statistics it guards, and errors name where the problem is.
"""

from __future__ import annotations

import numba
import numpy as np

from ._chunks import RowChunk

_OK, _NONFINITE, _NEGATIVE, _NONINTEGER = 0, 1, 2, 3


@numba.njit(nogil=True, cache=True)
def _first_problem(values, require_counts):
    for i in range(values.size):
        v = values[i]
        if not np.isfinite(v):
            return _NONFINITE, i
        if require_counts:
            if v < 0:
                return _NEGATIVE, i
            if v != np.floor(v):
                return _NONINTEGER, i
    return _OK, -1


def validate_chunk(chunk: RowChunk, *, where: str, require_counts: bool, expectation: str = "", hint: str = "") -> None:
    """Raise a ValueError naming the first NaN/inf (always) or non-count value (``require_counts``).

    ``where`` names the matrix (``"X"``, ``"layers['counts']"``); ``expectation`` says who needs
    counts (``"flavor='seurat_v3' expects raw counts"``); ``hint`` says what to do instead.
    """
    X = chunk.X
    values = X.data if hasattr(X, "indptr") else np.asarray(X).ravel()
    if values.dtype.kind not in "fiu":
        raise ValueError(f"{where} holds values of dtype {values.dtype}, not numbers.")
    if values.dtype.kind != "f":
        if require_counts and values.dtype.kind == "i" and values.size and values.min() < 0:
            code, index = _NEGATIVE, int(np.argmax(values < 0))
        else:
            return
    else:
        scan = values.astype(np.float32) if values.dtype == np.float16 else values  # numba has no float16
        code, index = _first_problem(scan, require_counts)
    if code == _OK:
        return
    cells = f"cells {chunk.start}–{chunk.stop - 1}"
    if code == _NONFINITE:
        raise ValueError(f"{where} contains NaN or infinite values ({cells}); fix or remove them first.")
    what = "negative values" if code == _NEGATIVE else "non-integer values"
    raise ValueError(f"{expectation}, but {where} has {what} (e.g. {values[index]:g} in {cells}). {hint}".strip())
