"""The open-set threshold (models/_open_set.py): the larger of the validation cells' tail and the widened spread."""

import numpy as np
import pytest

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
