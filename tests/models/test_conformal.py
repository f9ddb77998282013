"""Split conformal prediction sets: the quantile, coverage on exchangeable cells, class-conditional mode, labels."""

from __future__ import annotations

import numpy as np
import pytest

from cellmint.models import _conformal as conformal


def _cells(n, n_classes, rng):
    """Probabilities of a noisy classifier and true classes drawn from them (exchangeable by construction)."""
    logits = rng.normal(size=(n, n_classes)) * 2
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.array([rng.choice(n_classes, p=p) for p in proba])
    return proba, truth


def test_quantile_is_the_finite_sample_one():
    scores = np.arange(1, 10) / 10  # 9 calibration cells
    # alpha 0.2: ceil(10 * 0.8) = 8th smallest
    assert conformal.thresholds(scores, np.zeros(9, int), 1, 0.2)[0] == pytest.approx(0.8)
    # too few cells for alpha 0.05 (ceil(10 * 0.95) = 10 > 9): every class is in the set
    assert conformal.thresholds(scores, np.zeros(9, int), 1, 0.05)[0] == 1.0
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        conformal.thresholds(scores, np.zeros(9, int), 1, 1.5)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_marginal_coverage_holds_on_exchangeable_cells(alpha):
    rng = np.random.default_rng(0)
    coverages = []
    for _ in range(40):
        proba, truth = _cells(2000, 5, rng)
        calibration, test = slice(0, 1000), slice(1000, 2000)
        threshold = conformal.thresholds(conformal.scores(proba[calibration], truth[calibration]), truth[calibration],
                                         5, alpha)  # fmt: skip
        coverages.append(conformal.coverage(conformal.prediction_sets(proba[test], threshold), truth[test])["coverage"])
    # the guarantee: 1 - alpha ≤ E[coverage] ≤ 1 - alpha + 1 / (n + 1)
    assert 1 - alpha - 0.005 <= np.mean(coverages) <= 1 - alpha + 1 / 1001 + 0.005


def test_class_conditional_sets_cover_every_class_including_rare_ones():
    rng = np.random.default_rng(1)
    proba, truth = _cells(6000, 4, rng)
    rare = truth == 3
    proba[rare] = proba[rare][:, [3, 1, 2, 0]]  # class 3 now looks like class 0 to the classifier
    order = rng.permutation(6000)
    calibration, test = order[:3000], order[3000:]
    score = conformal.scores(proba[calibration], truth[calibration])
    marginal = conformal.prediction_sets(proba[test], conformal.thresholds(score, truth[calibration], 4, 0.1))
    per_class = conformal.prediction_sets(
        proba[test], conformal.thresholds(score, truth[calibration], 4, 0.1, class_conditional=True)
    )
    for c in range(4):
        cells = truth[test] == c
        assert conformal.coverage(per_class[cells], truth[test][cells])["coverage"] >= 0.87
    worst_marginal = min(conformal.coverage(marginal[truth[test] == c], truth[test][truth[test] == c])["coverage"]
                         for c in range(4))  # fmt: skip
    assert worst_marginal < 0.85  # the marginal sets under-cover the class the classifier confuses


def test_evaluate_without_a_test_part_uses_two_halves():
    rng = np.random.default_rng(2)
    proba, truth = _cells(4000, 6, rng)
    out = conformal.evaluate(proba, truth, None, None, 6, rng)
    assert out["evaluated_on"].startswith("validation")
    assert abs(out["marginal"]["coverage"] - 0.9) < 0.03
    assert out["marginal"]["n_cells"] == 4000


def test_set_labels_join_classes_in_model_order_and_empty_sets_are_empty_strings():
    members = np.array([[True, False, True], [False, False, False], [False, True, False], [True, False, True]])
    labels = conformal.set_labels(members, ["CD4 T", "B", "CD8 T"])
    assert list(labels.astype(str)) == ["CD4 T|CD8 T", "", "B", "CD4 T|CD8 T"]
    assert len(labels.categories) == 3
