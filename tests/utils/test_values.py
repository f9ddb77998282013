from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellmint._utils._chunks import RowChunk
from cellmint._utils._values import validate_chunk


def _chunk(values, dense=False):
    X = sp.csr_matrix(np.asarray(values, dtype=np.float32).reshape(2, -1))
    return RowChunk(10, 12, X.toarray() if dense else X)


@pytest.mark.parametrize("dense", [False, True])
def test_counts_pass_and_problems_are_named(dense):
    validate_chunk(_chunk([0, 1, 2, 30], dense), where="X", require_counts=True)
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values \(cells 10–11\)"):
        validate_chunk(_chunk([0, 1, np.nan, 3], dense), where="X", require_counts=False)
    with pytest.raises(ValueError, match=r"needs counts, but layers\['x'\] has non-integer values \(e.g. 0.5 in cells"):
        validate_chunk(
            _chunk([0, 1, 0.5, 3], dense), where="layers['x']", require_counts=True, expectation="needs counts"
        )
    with pytest.raises(ValueError, match=r"X has negative values \(e.g. -2 in cells 10–11\): c. Do this."):
        validate_chunk(_chunk([0, -2, 1, 3], dense), where="X", require_counts=True, expectation="c", hint="Do this.")
    validate_chunk(_chunk([0, 1, 0.5, 3], dense), where="X", require_counts=False)  # log data are fine


def test_integer_dtypes():
    validate_chunk(RowChunk(0, 1, np.array([[0, 3]], dtype=np.int32)), where="X", require_counts=True)
    with pytest.raises(ValueError, match="negative values"):
        validate_chunk(
            RowChunk(0, 1, np.array([[0, -3]], dtype=np.int32)), where="X", require_counts=True, expectation="c"
        )
    with pytest.raises(ValueError, match="not numbers"):
        validate_chunk(RowChunk(0, 1, np.array([["a"]])), where="X", require_counts=False)
