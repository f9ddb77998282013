"""What a matrix holds, told from its values: counts, log scales of scaled counts, values that are never expression."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import cellmint as cm
from cellmint.models._scale import InputScale, check_values, detect_scale, recover_counts


@pytest.fixture(scope="module")
def counts():
    adata = cm.datasets.cellbench()  # real CEL-seq2 + Drop-seq counts, bundled
    return sp.csr_matrix(adata.X, dtype=np.float32)


def _normalised(counts, target_sum):
    library = np.asarray(counts.sum(axis=1))
    values = counts.multiply(1 / library).tocsr() * (target_sum or float(np.median(library)))
    return sp.csr_matrix(values, dtype=np.float32)


@pytest.mark.parametrize(
    ("name", "transform", "base"),
    [
        ("log1p CP10k (scanpy)", lambda c: np.log1p(_normalised(c, 1e4).toarray()), "e"),
        ("log1p of the median library", lambda c: np.log1p(_normalised(c, None).toarray()), "e"),
        ("log2(CPM + 1)", lambda c: np.log2(_normalised(c, 1e6).toarray() + 1), "2"),
        ("log10(CPM + 1)", lambda c: np.log10(_normalised(c, 1e6).toarray() + 1), "10"),
        ("CP10k, not logged", lambda c: _normalised(c, 1e4).toarray(), "none"),
        ("log1p of counts (no scaling)", lambda c: np.log1p(c.toarray()), "e"),
        ("log1p CP10k stored as float16", lambda c: np.log1p(_normalised(c, 1e4).toarray()).astype(np.float16), "e"),
        ("scran-like size factors, log2", lambda c: np.log2(c.toarray() / np.linspace(0.5, 2, c.shape[0])[:, None] + 1),
         "2"),
    ],
)  # fmt: skip
def test_log_scales_are_recognised_and_give_the_counts_back(counts, name, transform, base):
    values = transform(counts)
    scale = detect_scale(values, where="X")
    assert (scale.kind, scale.base) == ("log", base), name
    assert scale.evidence > 0.95
    recovered = recover_counts(sp.csr_matrix(values.astype(np.float32)), scale)
    # proportions are exact; the counts themselves too unless float16 rounding moved large ones
    proportions = lambda m: sp.csr_matrix(m).multiply(1 / np.asarray(m.sum(axis=1))).toarray()  # noqa: E731
    np.testing.assert_allclose(proportions(recovered), proportions(counts), atol=2e-3 if "float16" in name else 1e-6)
    if "float16" not in name:
        assert abs(recovered - counts).max() == 0


def test_counts_and_unrecognised_values(counts):
    assert detect_scale(counts, where="X").kind == "counts"
    assert detect_scale(counts.astype(np.int32), where="X").kind == "counts"
    rng = np.random.default_rng(0)
    residuals = np.abs(rng.normal(size=(50, 200))) * 3  # non-negative, no per-cell scaling of counts behind them
    scale = detect_scale(residuals, where="X")
    assert scale.kind == "unrecognised"
    assert not scale.recoverable
    with pytest.raises(ValueError, match="neither raw counts nor a log of counts"):
        detect_scale(residuals * 10, where="X")


def test_bad_values_name_the_problem_and_the_cell(counts):
    names = [f"cell{i}" for i in range(counts.shape[0])]
    log = np.log1p(_normalised(counts, 1e4).toarray())
    nan = log.copy()
    nan[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(nan in cell 'cell7' \(row 7\)\)"):
        detect_scale(nan, where="The query's X", names=names)
    inf = sp.csr_matrix(log)
    inf.data[inf.indptr[4]] = np.inf
    with pytest.raises(ValueError, match="cell 'cell4'"):
        check_values(inf, where="X", names=names, counts=False)
    scaled = sc.pp.scale(log.copy())
    with pytest.raises(ValueError, match=r"negative values .* look z-scored \(sc\.pp\.scale\)"):
        detect_scale(scaled, where="X")
    mixed = counts.copy()
    mixed.data[mixed.indptr[9] + 1] = 0.5
    with pytest.raises(ValueError, match=r"taken for raw counts, but has a non-integer value \(0\.5 in row 9\)"):
        check_values(mixed, where="X", counts=True)
    with pytest.raises(ValueError, match="holds no non-zero values"):
        detect_scale(sp.csr_matrix((5, 10), dtype=np.float32), where="X")
    with pytest.raises(ValueError, match="dtype"):
        check_values(np.array([["a"]], dtype=object), where="X", counts=False)


def test_scale_describes_itself_for_uns():
    record = InputScale("log", "2", 0.99).to_dict()
    assert record == {
        "kind": "log",
        "base": "2",
        "evidence": 0.99,
        "description": "log2(x + 1) of counts scaled per cell",
    }
