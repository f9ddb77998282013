"""Prediction sets with a coverage guarantee: split conformal classification on held-out reference cells.

At training, each validation cell of a level gets the score ``1 - p(true class)`` from the model's
calibrated probabilities. For a miscoverage level ``alpha``, the threshold ``q`` is the
``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the ``n`` scores, and a cell's prediction
set holds every class with ``p ≥ 1 - q``. When the query cells are exchangeable with the
calibration cells (same kind of data as the reference's held-out cells), the set contains the true
class with probability at least ``1 - alpha`` (and at most ``1 - alpha + 1 / (n + 1)``), whatever
the model (Vovk et al. 2005; Sadinle, Lei & Wasserman 2019, whose score this is: it gives the
smallest sets on average).

- **class-conditional** (Mondrian) sets calibrate one threshold per class on the calibration cells
  of that class, so the guarantee holds within every class, rare ones included, at the price of
  larger sets; a class with fewer than ``1 / alpha - 1`` calibration cells gets threshold 1 (the
  class is always in the set: too few cells to promise anything smaller).
- an **empty set** means no class is plausible at that level: the cell is unlike the held-out
  cells of every known class (often a type the reference lacks).

The guarantee is marginal over cells and needs exchangeability: under a shift of technology or
chemistry, coverage can fall below ``1 - alpha`` (``benchmarks/annotate_quality.py`` measures it).
The scores of up to :data:`MAX_CALIBRATION_CELLS` validation cells per level are kept with the
model, so ``alpha`` can be chosen when annotating.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: the miscoverage level of the coverage figures recorded at training and of ``annotate``'s default
ALPHA = 0.1
#: calibration cells kept per level (a random subset of more is still exchangeable with the query)
MAX_CALIBRATION_CELLS = 50_000
#: separates the classes of a set in its label ("CD4 T|CD8 T")
SEPARATOR = "|"


def scores(proba: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Nonconformity of each calibration cell: one minus the probability of its true class."""
    return (1.0 - np.asarray(proba, np.float64)[np.arange(len(truth)), np.asarray(truth)]).astype(np.float32)


def _quantile(values: np.ndarray, alpha: float) -> float:
    """The conformal quantile: the ``ceil((n + 1)(1 - alpha))``-th smallest value, or 1 when ``n`` is too small."""
    n = len(values)
    rank = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or rank > n:
        return 1.0
    return float(np.partition(np.asarray(values, np.float64), rank - 1)[rank - 1])


def thresholds(calibration_scores: np.ndarray, calibration_classes: np.ndarray, n_classes: int, alpha: float, *,
               class_conditional: bool = False) -> np.ndarray:  # fmt: skip
    """Score threshold per class (all equal unless ``class_conditional``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1 (the share of cells whose set may miss), not {alpha!r}.")
    if not class_conditional:
        return np.full(n_classes, _quantile(calibration_scores, alpha))
    classes = np.asarray(calibration_classes)
    return np.array([_quantile(calibration_scores[classes == c], alpha) for c in range(n_classes)])


def prediction_sets(proba: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Cells × classes: whether the class is in the cell's set (``1 - p ≤ threshold`` of the class)."""
    # a tolerance of float32 rounding, so a calibration cell exactly at the threshold is covered
    return (1.0 - np.asarray(proba, np.float64)) <= np.asarray(threshold)[None, :] + 1e-6


def coverage(members: np.ndarray, truth: np.ndarray) -> dict:
    """Share of cells whose set holds their true class, mean set size and share of empty sets (JSON-writable)."""
    n = len(truth)
    if n == 0:
        return {"n_cells": 0, "coverage": float("nan"), "mean_size": float("nan"), "empty": float("nan")}
    sizes = members.sum(axis=1)
    return {
        "n_cells": int(n),
        "coverage": float(members[np.arange(n), np.asarray(truth)].mean()),
        "mean_size": float(sizes.mean()),
        "empty": float((sizes == 0).mean()),
    }


def set_labels(members: np.ndarray, classes: list[str]) -> pd.Categorical:
    """Each cell's set as one label, its classes joined by :data:`SEPARATOR` in the model's order ("" when empty)."""
    if len(members) == 0:
        return pd.Categorical([], categories=[""])
    patterns, inverse = np.unique(np.packbits(members, axis=1), axis=0, return_inverse=True)
    unpacked = np.unpackbits(patterns, axis=1, count=members.shape[1]).astype(bool)
    names = [SEPARATOR.join(c for c, inside in zip(classes, row, strict=True) if inside) for row in unpacked]
    return pd.Categorical.from_codes(np.asarray(inverse).ravel(), categories=pd.Index(names).astype(object))


def evaluate(calibration_proba: np.ndarray, calibration_truth: np.ndarray, proba: np.ndarray | None,
             truth: np.ndarray | None, n_classes: int, rng: np.random.Generator,
             alpha: float = ALPHA) -> dict:  # fmt: skip
    """Coverage, mean set size and empty share of sets at ``alpha``, marginal and class-conditional.

    On the cells ``proba``/``truth`` (the test part) when given; otherwise the calibration cells are
    split in two halves at random, each half's sets calibrated on the other (an honest estimate
    without a test part).
    """
    score = scores(calibration_proba, calibration_truth)
    out = {"alpha": alpha, "evaluated_on": "test"}
    if proba is None or len(truth) == 0:
        halves = rng.permutation(len(score)) % 2 == 0
        out["evaluated_on"] = "validation (two halves, each calibrated on the other)"
    for mode, class_conditional in (("marginal", False), ("class", True)):
        if out["evaluated_on"] == "test":
            threshold = thresholds(score, calibration_truth, n_classes, alpha, class_conditional=class_conditional)
            out[mode] = coverage(prediction_sets(proba, threshold), truth)
            continue
        members, order = [], []
        for held in (halves, ~halves):
            threshold = thresholds(score[~held], calibration_truth[~held], n_classes, alpha,
                                   class_conditional=class_conditional)  # fmt: skip
            members.append(prediction_sets(calibration_proba[held], threshold))
            order.append(np.flatnonzero(held))
        out[mode] = coverage(np.concatenate(members), calibration_truth[np.concatenate(order)])
    return out
