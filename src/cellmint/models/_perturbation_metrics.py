"""Perturbation-response metrics on log1p-normalised expression: one function per formula, cell-eval's definitions.

The definitions follow cell-eval 0.8.2 (Arc Institute's evaluator of the Virtual Cell Challenge),
so numbers can be compared with published ones:

- a *pseudobulk* is the arithmetic mean of log1p values over cells; a *delta* is a pseudobulk minus
  the control pseudobulk of the same object and context;
- differential expression (DE) is a two-sided Mann–Whitney U test of each gene, perturbed cells
  against control cells (normal approximation with tie and continuity corrections, scipy's
  ``method="asymptotic"``), Benjamini–Hochberg FDR across the genes of one perturbation, and
  ``log2FC = log2(expm1(mean log1p perturbed) / expm1(mean log1p control))`` (0/0 is 0);
- the significant genes are those with FDR < 0.05, ranked by |log2FC| (ties in gene order).

:data:`BEST_VALUE` gives the best value of each metric that has one; :func:`normalized_score`
turns a metric into a score against a baseline with cell-eval's formulas.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

#: FDR below which a gene counts as differentially expressed (strict, as in cell-eval)
FDR_THRESHOLD = 0.05
#: metrics with a best value (0: an error; 1: a correlation, rank or overlap), for baseline-normalised scores
BEST_VALUE = {
    "pearson_delta": 1.0,
    "pearson_delta_top": 1.0,
    "mse": 0.0,
    "mae": 0.0,
    "mse_delta": 0.0,
    "mae_delta": 0.0,
    "discrimination_score_l1": 1.0,
    "overlap_at_N": 1.0,
    "overlap_at_k": 1.0,
    "precision_at_N": 1.0,
    "precision_at_k": 1.0,
    "energy_distance": 0.0,
}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant (scipy's ``pearsonr`` value, no warning)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    norm = np.sqrt((x @ x) * (y @ y))
    if norm == 0 or len(x) < 2:
        return float("nan")
    return float(np.clip((x @ y) / norm, -1.0, 1.0))


def mean_squared_error(pred: np.ndarray, real: np.ndarray) -> float:
    """Mean over genes of the squared difference."""
    return float(np.mean((np.asarray(pred, dtype=np.float64) - real) ** 2))


def mean_absolute_error(pred: np.ndarray, real: np.ndarray) -> float:
    """Mean over genes of the absolute difference."""
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - real)))


def discrimination_scores(real_deltas: np.ndarray, pred_deltas: np.ndarray, genes, perturbations) -> np.ndarray:
    """cell-eval's ``discrimination_score_l1`` of each perturbation: ``1 − rank / N``.

    For perturbation ``p`` (row ``p`` of both perturbations × genes matrices), the rank is the number
    of real deltas closer (L1 distance) to the predicted delta of ``p`` than the real delta of ``p``
    itself, so 1 means the prediction is nearest its own perturbation and ``1/N`` that it is
    farthest. The gene named like the perturbation (a CRISPR target) is left out of the distances.
    Ties count in the prediction's favour (cell-eval's unstable sort leaves their order arbitrary).
    """
    genes = np.asarray(genes).astype(str)
    n = len(perturbations)
    scores = np.empty(n)
    for i, perturbation in enumerate(perturbations):
        keep = genes != str(perturbation)
        distances = np.abs(real_deltas[:, keep] - pred_deltas[i, keep]).sum(axis=1)
        scores[i] = 1.0 - np.count_nonzero(distances < distances[i]) / n
    return scores


def _mean_distance(x: np.ndarray, y: np.ndarray) -> float:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return float(np.sqrt(np.maximum(squared, 0.0)).mean())


def subsample(cells: np.ndarray, max_cells: int | None, random_state: int = 0) -> np.ndarray:
    """At most ``max_cells`` rows of ``cells``, drawn without replacement (order kept) by a local seeded generator."""
    if max_cells is None or len(cells) <= max_cells:
        return cells
    rng = np.random.default_rng(random_state)
    return cells[np.sort(rng.choice(len(cells), max_cells, replace=False))]


def energy_distance(x: np.ndarray, y: np.ndarray, *, max_cells: int | None = 1000, random_state: int = 0) -> float:
    """Energy distance between two sets of cells (rows): ``2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖``.

    The V-statistic with Euclidean distances (the means include the zero self-distances), as in
    cell-eval's ``edistance``; 0 for identical sets. A set larger than ``max_cells`` is replaced by
    a random subset of that size (:func:`subsample`, each set on its own), which keeps the cost
    quadratic in ``max_cells`` rather than in the number of cells.
    """
    x, y = (subsample(np.asarray(s, dtype=np.float64), max_cells, random_state) for s in (x, y))
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    return 2.0 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


def mann_whitney_pvalues(perturbed: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Two-sided Mann–Whitney U p-value of each gene (column), perturbed cells against control cells.

    scipy's asymptotic test with tie and continuity corrections (what cell-eval's ``pdex`` computes);
    a gene with one value in all cells of both groups has no evidence of a difference: p = 1.
    """
    p_values = np.ones(perturbed.shape[1])
    if len(perturbed) == 0 or len(control) == 0:
        return p_values
    both = np.concatenate([perturbed, control])
    varies = both.max(axis=0) > both.min(axis=0)
    if varies.any():
        p_values[varies] = stats.mannwhitneyu(perturbed[:, varies], control[:, varies], axis=0,
                                              method="asymptotic", use_continuity=True).pvalue  # fmt: skip
    return p_values


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (FDR) of one perturbation's genes."""
    return stats.false_discovery_control(p_values) if len(p_values) else np.empty(0)


def log2_fold_change(perturbed_mean: np.ndarray, control_mean: np.ndarray) -> np.ndarray:
    """``log2(expm1(perturbed) / expm1(control))`` of mean log1p values; 0/0 is 0, a one-sided zero ±inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(perturbed_mean) / np.expm1(control_mean))
    return np.where(np.isnan(lfc), 0.0, lfc)


def differential_expression(perturbed: np.ndarray, control: np.ndarray) -> dict[str, np.ndarray]:
    """Per gene: ``p_value``, ``fdr`` and ``log2_fold_change`` of perturbed cells against control cells."""
    p_values = mann_whitney_pvalues(perturbed, control)
    return {
        "p_value": p_values,
        "fdr": benjamini_hochberg(p_values),
        "log2_fold_change": log2_fold_change(perturbed.mean(axis=0), control.mean(axis=0)),
    }


def significant_genes(de: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the genes with FDR < 0.05, most changed (|log2FC|) first; ties keep gene order."""
    significant = np.flatnonzero(de["fdr"] < FDR_THRESHOLD)
    return significant[np.argsort(-np.abs(de["log2_fold_change"][significant]), kind="stable")]


def top_genes(de: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The ``k`` genes of a top-k metric: the ``k`` most changed significant genes, else the ``k`` of lowest p-value.

    The second rule (fewer than ``k`` significant genes) keeps the metric defined, on the genes with
    the strongest evidence, when a perturbation changes few genes; ties in p-value are broken by
    |log2FC|, then gene order.
    """
    significant = significant_genes(de)
    if len(significant) >= k:
        return significant[:k]
    order = np.lexsort((np.arange(len(de["p_value"])), -np.abs(de["log2_fold_change"]), de["p_value"]))
    return order[:k]


def overlap(
    real_ranked: np.ndarray, pred_ranked: np.ndarray, k: int | None = None, *, metric: str = "overlap"
) -> float:
    """cell-eval's ``overlap_at_k`` / ``precision_at_k`` of two ranked significant-gene lists.

    Both lists are cut to ``k_eff`` genes and the share of shared genes is returned:
    ``overlap``: ``k_eff = min(k, len(real))`` (``k=None``: all real significant genes);
    ``precision``: ``k_eff = min(k, len(pred))`` (``k=None``: all predicted significant genes).
    0 when ``k_eff`` is 0.
    """
    if metric not in ("overlap", "precision"):
        raise ValueError(f"metric must be 'overlap' or 'precision', not {metric!r}.")
    size = len(real_ranked) if metric == "overlap" else len(pred_ranked)
    k_eff = size if k is None else min(k, size)
    if k_eff == 0:
        return 0.0
    return len(np.intersect1d(real_ranked[:k_eff], pred_ranked[:k_eff])) / k_eff


def normalized_score(value, baseline, best: float):
    """cell-eval's score of a metric against a baseline, for a metric whose best value is ``best``.

    ``1 − value/baseline`` (best 0) or ``(value − baseline)/(1 − baseline)`` (best 1): 0 is the
    baseline, 1 perfect, negative worse than the baseline; not clipped (cell-eval clips at 0 when it
    averages scores).
    """
    value, baseline = np.asarray(value, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if best == 0.0:
            return 1.0 - value / baseline
        if best == 1.0:
            return (value - baseline) / (1.0 - baseline)
    raise ValueError(f"best must be 0 or 1, not {best!r}.")
