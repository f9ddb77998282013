"""The open-set rule (models/_open_set.py): the threshold (the larger of the validation cells' tail and the widened
spread) and the query's expression space, where neighbourhoods are found."""

import numpy as np
import pytest

from cellmint.models import _open_set as rule
from cellmint.models._open_set import SHIFT_POWER, calibration, query_threshold


def entry(spacing_q99: float, validation_q99: float, reference_q25: float = 1.0) -> dict:
    return {"rule": "neighbourhood", "floor": max(spacing_q99, validation_q99), "spacing_q99": spacing_q99,
            "validation_q99": validation_q99, "reference_q25": reference_q25, "shift_quantile": 0.25,
            "shift_power": SHIFT_POWER}  # fmt: skip


def scores(q25: float) -> np.ndarray:
    return np.full(100, q25)


def test_an_unshifted_query_is_judged_by_the_floor():
    for spacing, validation in ((2.0, 1.5), (2.0, 6.0)):
        threshold, info = query_threshold(entry(spacing, validation), scores(0.9), "auto")
        assert threshold == pytest.approx(max(spacing, validation))
        assert info["shift"] == 1.0
        assert info["threshold"] == threshold


def test_a_shift_widens_the_reference_spread_not_the_validation_tail():
    # the reference's spread dominates: widened by shift ** SHIFT_POWER (CellBench across technologies)
    threshold, _ = query_threshold(entry(2.0, 1.5), scores(1.6), "auto")
    assert threshold == pytest.approx(2.0 * 1.6**SHIFT_POWER)
    # a long validation tail (a small, memorised reference) is kept as it is, not multiplied by the widening:
    # pbmc3k on the FACS-sorted PBMC, floor 5.6 and shift 1.6, threshold 6.8 (the product gave 17.8)
    threshold, info = query_threshold(entry(2.14, 5.64, 0.88), scores(1.40), "auto")
    assert threshold == pytest.approx(2.14 * (1.40 / 0.88) ** SHIFT_POWER)
    assert 6 < threshold < 7
    assert info["widened_spread"] == pytest.approx(threshold)
    threshold, _ = query_threshold(entry(2.0, 6.0), scores(1.2), "auto")
    assert threshold == pytest.approx(6.0)  # widened spread 3.2 < validation tail


def test_given_thresholds_and_older_models_keep_theirs():
    assert query_threshold(entry(2.0, 6.0), scores(5.0), 3.5) == (3.5, {"rule": "given (max_distance)"})
    threshold, info = query_threshold({"threshold": 4.2}, scores(5.0), "auto")
    assert threshold == 4.2
    assert info["rule"].startswith("reference")


def test_calibration_records_both_tails():
    rng = np.random.default_rng(0)
    spacing = rng.gamma(20, 0.05, 400)
    classes = np.repeat([0, 1], 200)
    validation = np.concatenate([rng.gamma(20, 0.05, 36), [5.0, 6.0, 7.0, 8.0]])
    out = calibration(spacing, classes, 2, distance=validation, nearest_class=np.zeros(40, int))
    assert out["floor"] == max(out["spacing_q99"], out["validation_q99"]) == out["validation_q99"]
    assert out["spacing_q99"] < 2 < out["validation_q99"]


@pytest.mark.parametrize("genes", [12, 400])  # fewer genes than cells (covariance) and more (cells × cells)
def test_query_expression_axes_are_the_principal_axes_of_the_kept_cells(genes):
    rng = np.random.default_rng(0)
    values = rng.gamma(1.0, size=(300, genes)).astype(np.float32)
    values[:100, :5] += 4  # a group apart: the first axis
    expression = rule.QueryExpression(len(values))
    for start in range(0, len(values), 64):  # chunk by chunk, as the network pass hands them over
        chunk = values[start : start + 64]
        expression.add(chunk[expression.wanted(start, len(chunk))])
    coordinates = expression.fit().astype(np.float64)
    assert expression.complete
    assert coordinates.shape == (300, min(rule.EXPRESSION_DIMS, genes))
    centred = values.astype(np.float64) - values.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    # the same coordinates as an SVD, up to each axis's sign (distances, hence neighbours, are unchanged)
    expected = centred @ vt[: coordinates.shape[1]].T
    np.testing.assert_allclose(np.abs(coordinates[:, :5]), np.abs(expected[:, :5]), rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(np.linalg.norm(coordinates, axis=0)[:5], singular[:5], rtol=1e-2)
    np.testing.assert_allclose(expression.project(values).astype(np.float64), coordinates, atol=1e-2)


def test_query_expression_samples_large_queries_and_places_every_cell(monkeypatch):
    monkeypatch.setattr(rule, "AXES_CELLS", 50)
    rng = np.random.default_rng(1)
    values = rng.normal(size=(200, 8)).astype(np.float32)
    expression = rule.QueryExpression(len(values), random_state=3)
    assert not expression.complete
    assert len(expression.sample) == 50
    assert np.array_equal(expression.sample, rule.QueryExpression(200, random_state=3).sample)  # seeded
    for start in range(0, 200, 30):
        chunk = values[start : start + 30]
        expression.add(chunk[expression.wanted(start, len(chunk))])
    sampled = expression.fit()
    np.testing.assert_allclose(expression.project(values[expression.sample]), sampled, atol=1e-2)
    one = rule.QueryExpression(1)
    one.add(values[:1])
    assert one.fit().shape == (1, 1)  # a one-cell query has no axes and no neighbours


def test_class_factors_come_from_held_out_cells_of_classes_with_enough_of_them():
    rng = np.random.default_rng(0)
    near = rng.uniform(0.8, 1.2, 200)
    far = 3 * rng.uniform(0.8, 1.2, 100)  # new cells of class 1 sit three times as far (T cells of a small reference)
    few = 5 * np.ones(rule.CLASS_FACTOR_CELLS - 1)  # class 2: too few held-out cells for a factor of its own
    validation = np.concatenate([near, far, few])
    nearest = np.repeat([0, 1, 2], [len(near), len(far), len(few)])
    factor = rule.class_factors(validation, nearest, 4)
    overall = np.median(validation)
    np.testing.assert_allclose(factor[:2], [np.median(near) / overall, np.median(far) / overall])
    assert factor[2] == 1.0  # too few
    assert factor[3] == 1.0  # no held-out cell at all
    entry = calibration(np.ones(50), np.zeros(50, int), 4, distance=validation, nearest_class=nearest)
    np.testing.assert_allclose(entry["class_factor"], factor)


def test_a_class_whose_new_cells_sit_far_does_not_widen_the_threshold():
    """pbmc3k on FACS-sorted PBMC: a query of mostly T cells is not a shifted query when new T cells always sit far."""
    open_set = entry(2.0, 6.0) | {"class_factor": [1.0, 2.5]}
    scores = np.concatenate([np.full(20, 1.0), np.full(80, 2.5)])  # 80% of the cells nearest to class 1
    nearest = np.repeat([0, 1], [20, 80])
    widened, how = query_threshold(open_set, scores, "auto")  # without the classes: a shift of 2.5
    assert how["shift"] == pytest.approx(2.5)
    assert not how["class_factors"]
    assert widened > 6.0
    threshold, how = query_threshold(open_set, scores, "auto", nearest)
    assert how["shift"] == pytest.approx(1.0)
    assert how["class_factors"]
    assert threshold == pytest.approx(6.0)  # the floor
    # a model saved without class factors measures the shift as before
    older = {k: v for k, v in open_set.items() if k != "class_factor"}
    assert query_threshold(older, scores, "auto", nearest)[0] == pytest.approx(widened)
