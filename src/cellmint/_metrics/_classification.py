"""Classification metrics and calibration: accuracy, macro-F1, recall, confusion, ECE, temperature.

Macro-F1 averages the F1 of the classes present in the truth or the predictions (scikit-learn's
``f1_score(average="macro")`` over those labels, computed by it). ECE uses equal-width confidence bins.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def classification_report(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class recall and the confusion matrix (h5ad/JSON-friendly values), by scikit-learn.

    (A bincount version took 0.06 ms against scikit-learn's 42 ms for 10,000 cells of 48 classes; called
    once per level and epoch, that difference is lost in an epoch's seconds, so scikit-learn computes it.)
    """
    from sklearn.metrics import confusion_matrix, f1_score

    n = len(classes)
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if len(truth) == 0:
        confusion = np.zeros((n, n), dtype=np.int64)
    else:
        confusion = confusion_matrix(truth, predicted, labels=np.arange(n))
    true_count, hits = confusion.sum(axis=1), np.diag(confusion)
    present = np.flatnonzero(true_count + confusion.sum(axis=0))  # in the truth or the predictions
    macro_f1 = f1_score(truth, predicted, labels=present, average="macro", zero_division=0) if len(present) else 0.0
    return {
        "n_cells": len(truth),
        "accuracy": float(hits.sum() / max(1, len(truth))),
        "macro_f1": float(macro_f1),
        "recall": {classes[c]: float(hits[c] / true_count[c]) for c in range(n) if true_count[c] > 0},
        "confusion": confusion.tolist(),
    }


#: equal-width confidence bins of the ECE, everywhere in cellmint (model metrics, reliability plots, demo)
ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the cell-weighted mean gap between confidence and accuracy over ``n_bins`` equal-width bins."""
    if len(confidence) == 0:
        return 0.0
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    table = pd.DataFrame({"bin": bins, "confidence": confidence, "correct": correct.astype(float)})
    per_bin = table.groupby("bin").agg(n=("correct", "size"), accuracy=("correct", "mean"), conf=("confidence", "mean"))
    return float((per_bin["n"] * (per_bin["accuracy"] - per_bin["conf"]).abs()).sum() / len(confidence))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (optimised on log T with LBFGS).

    When every cell is classified correctly, the NLL keeps falling as T → 0 and says nothing about
    errors to come: T stays 1 (no sharpening without evidence).
    """
    if len(labels) == 0 or bool((logits.argmax(1) == labels).all()):
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    logits = logits.detach().double()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.double().exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))
