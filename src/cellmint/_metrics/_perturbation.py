"""Perturbation-response metrics on log1p-normalised expression: one function per formula, cell-eval's definitions.

The definitions follow cell-eval 0.8.2 (Arc Institute's evaluator of the Virtual Cell Challenge),
so numbers can be compared with published ones:

- a *pseudobulk* is the arithmetic mean of log1p values over cells; a *delta* is a pseudobulk minus
  the control pseudobulk of the same object and context;
- differential expression (DE) is a two-sided Mann–Whitney U test of each gene, perturbed cells
  against control cells (normal approximation with tie and continuity corrections, scipy's
  ``method="asymptotic"``), Benjamini–Hochberg FDR across the genes of one perturbation, and
  ``log2FC = log2(expm1(mean log1p perturbed) / expm1(mean log1p control))`` (0/0 is 0);
- the significant genes are those with FDR < 0.05, ranked by |log2FC| (ties in gene order); like
  cell-eval, which stores DE tables in float32, FDR and log2FC are compared and ranked as float32.

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
    "discrimination_score_l2": 1.0,
    "discrimination_score_cosine": 1.0,
    "pearson_edistance": 1.0,
    "overlap_at_N": 1.0,
    "overlap_at_k": 1.0,
    "precision_at_N": 1.0,
    "precision_at_k": 1.0,
    "de_spearman_sig": 1.0,
    "de_direction_match": 1.0,
    "de_spearman_lfc_sig": 1.0,
    "de_sig_genes_recall": 1.0,
    "pr_auc": 1.0,
    "roc_auc": 1.0,
    "clustering_agreement": 1.0,
    "energy_distance": 0.0,
}
#: the distances of the discrimination score (cell-eval's names; scikit-learn's metrics)
DISCRIMINATION_DISTANCES = {"l1": "manhattan", "l2": "euclidean", "cosine": "cosine"}


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


def discrimination_scores(real_deltas: np.ndarray, pred_deltas: np.ndarray, genes, perturbations,
                          distance: str = "l1") -> np.ndarray:  # fmt: skip
    """cell-eval's ``discrimination_score_{l1,l2,cosine}`` of each perturbation: ``1 − rank / N``.

    For perturbation ``p`` (row ``p`` of both perturbations × genes matrices), the rank is the number
    of real deltas closer to the predicted delta of ``p`` than the real delta of ``p`` itself, by
    ``distance`` (``"l1"``: Manhattan, ``"l2"``: Euclidean, ``"cosine"``: 1 − cosine similarity, as
    scikit-learn's ``pairwise_distances`` computes them), so 1 means the prediction is nearest its own
    perturbation and ``1/N`` that it is farthest. The gene named like the perturbation (a CRISPR
    target) is left out of the distances. A tie with the true perturbation counts half (cell-eval's
    unstable sort leaves the order of ties arbitrary): a zero predicted delta, equally far in cosine
    from every real delta, scores about 0.5, not 1.
    """
    from sklearn.metrics import pairwise_distances

    if distance not in DISCRIMINATION_DISTANCES:
        raise ValueError(f"distance must be one of {list(DISCRIMINATION_DISTANCES)}, not {distance!r}.")
    genes = np.asarray(genes).astype(str)
    n = len(perturbations)
    scores = np.empty(n)
    for i, perturbation in enumerate(perturbations):
        keep = genes != str(perturbation)
        if distance == "l1":
            distances = np.abs(real_deltas[:, keep] - pred_deltas[i, keep]).sum(axis=1)
        else:
            distances = pairwise_distances(real_deltas[:, keep], pred_deltas[i : i + 1, keep],
                                           metric=DISCRIMINATION_DISTANCES[distance]).ravel()  # fmt: skip
        closer = np.count_nonzero(distances < distances[i])
        tied = np.count_nonzero(distances == distances[i]) - 1
        scores[i] = 1.0 - (closer + 0.5 * tied) / n
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


def _float32(values: np.ndarray) -> np.ndarray:
    """Values as cell-eval's DE tables hold them (float32), back in float64 for the arithmetic."""
    return np.asarray(values).astype(np.float32).astype(np.float64)


def is_significant(de: dict[str, np.ndarray]) -> np.ndarray:
    """Per gene: FDR < 0.05 (the FDR as float32, as cell-eval compares it)."""
    return _float32(de["fdr"]) < FDR_THRESHOLD


def significant_genes(de: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the genes with FDR < 0.05, most changed (|log2FC| in float32) first; ties keep gene order."""
    significant = np.flatnonzero(is_significant(de))
    return significant[np.argsort(-np.abs(_float32(de["log2_fold_change"][significant])), kind="stable")]


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


# -- metrics of two DE tables (cell-eval's DE metric family) ---------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    return stats.rankdata(values, method="average")


def de_direction_match(real: dict[str, np.ndarray], pred: dict[str, np.ndarray]) -> float:
    """Share of the real significant genes whose predicted log2FC has the same sign (0 is a sign); NaN if none."""
    significant = is_significant(real)
    if not significant.any():
        return float("nan")
    real_sign = np.sign(_float32(real["log2_fold_change"][significant]))
    return float(np.mean(real_sign == np.sign(_float32(pred["log2_fold_change"][significant]))))


def de_spearman_lfc_sig(real: dict[str, np.ndarray], pred: dict[str, np.ndarray]) -> float:
    """Spearman correlation of real and predicted log2FC over the real significant genes (average ranks); NaN if < 2."""
    significant = is_significant(real)
    real_lfc = _float32(real["log2_fold_change"][significant])
    pred_lfc = _float32(pred["log2_fold_change"][significant])
    if len(real_lfc) < 2:
        return float("nan")
    return pearson(_ranks(real_lfc), _ranks(pred_lfc))


def de_sig_genes_recall(real: dict[str, np.ndarray], pred: dict[str, np.ndarray]) -> float:
    """Share of the real significant genes that are significant in the prediction too; NaN when none is real."""
    significant = is_significant(real)
    if not significant.any():
        return float("nan")
    return float(np.count_nonzero(significant & is_significant(pred)) / np.count_nonzero(significant))


def de_spearman_sig(n_real: np.ndarray, n_pred: np.ndarray) -> float:
    """Spearman correlation, over perturbations with real significant genes, of the numbers of significant genes.

    A context-level metric (one value for all of a context's perturbations): 1 when no perturbation
    has real significant genes (cell-eval's convention), NaN with only one that has.
    """
    n_real, n_pred = np.asarray(n_real, dtype=np.float64), np.asarray(n_pred, dtype=np.float64)
    kept = n_real > 0
    if not kept.any():
        return 1.0
    if kept.sum() < 2:
        return float("nan")
    return pearson(_ranks(n_real[kept]), _ranks(n_pred[kept]))


def significance_auc(real: dict[str, np.ndarray], pred: dict[str, np.ndarray], kind: str = "pr") -> float:
    """cell-eval's ``pr_auc`` / ``roc_auc``: how well the predicted FDRs rank the real significant genes.

    Labels: real FDR < 0.05; scores: ``−log10`` of the predicted FDR clipped to [1e-10, 1], in float32.
    ``"pr"``: average precision; ``"roc"``: area under the ROC curve. NaN when every gene, or none, is
    significant in the real cells.
    """
    from sklearn.metrics import auc, average_precision_score, roc_curve

    labels = is_significant(real).astype(np.float64)
    if not 0 < labels.sum() < len(labels):
        return float("nan")
    scores = -np.log10(np.clip(np.asarray(pred["fdr"]).astype(np.float32), np.float32(1e-10), np.float32(1.0)))
    if kind == "pr":
        return float(average_precision_score(labels, scores))
    if kind == "roc":
        false_positive, true_positive, _ = roc_curve(labels, scores)
        return float(auc(false_positive, true_positive))
    raise ValueError(f"kind must be 'pr' or 'roc', not {kind!r}.")


# -- context-level metrics over all of a context's perturbations --------------------------------------------------


def _sklearn_energy(x: np.ndarray, y: np.ndarray, sigma_y: float) -> float:
    from sklearn.metrics import pairwise_distances

    return float(2 * pairwise_distances(x, y).mean() - pairwise_distances(x).mean() - sigma_y)


def pearson_edistance(real_sets: list[np.ndarray], real_control: np.ndarray, pred_sets: list[np.ndarray],
                      pred_control: np.ndarray) -> float:  # fmt: skip
    """cell-eval's ``pearson_edistance``: Pearson, over perturbations, of real vs predicted energy distances to control.

    Each perturbation's energy distance (V-statistic, Euclidean, every cell) from the control cells
    of the same object, computed with scikit-learn's distances as cell-eval does; NaN with fewer than
    two perturbations or a constant side.
    """
    from sklearn.metrics import pairwise_distances

    if len(real_sets) < 2:
        return float("nan")
    sigma_real = float(pairwise_distances(real_control).mean())
    sigma_pred = float(pairwise_distances(pred_control).mean())
    real = [_sklearn_energy(cells, real_control, sigma_real) for cells in real_sets]
    pred = [_sklearn_energy(cells, pred_control, sigma_pred) for cells in pred_sets]
    return pearson(np.asarray(real), np.asarray(pred))


#: cell-eval's clustering_agreement: Leiden resolutions of the real and of the predicted centroids
REAL_RESOLUTION, PRED_RESOLUTIONS = 1.0, (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0)


def _leiden(centroids: np.ndarray, resolutions, n_neighbors: int = 15) -> list[np.ndarray]:
    import warnings

    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.asarray(centroids, dtype=np.float64))
    with warnings.catch_warnings():  # scanpy's notices about its future defaults are not ours to raise
        warnings.simplefilter("ignore", FutureWarning)
        sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, adata.n_obs - 1), use_rep="X")
        labels = []
        for resolution in resolutions:
            sc.tl.leiden(adata, resolution=resolution, key_added="leiden", flavor="igraph", n_iterations=2)
            labels.append(adata.obs["leiden"].to_numpy().astype(str))
    return labels


def clustering_agreement(real_centroids: np.ndarray, pred_centroids: np.ndarray) -> float:
    """cell-eval's ``clustering_agreement``: the best adjusted mutual information between Leiden clusters.

    The real perturbations' pseudobulks (rows, in one order on both sides) are clustered once at
    resolution 1; the predicted ones at resolutions 0.2–2; the best AMI (at least 0) is returned.
    Needs the ``igraph`` package (scanpy's ``flavor="igraph"``); NaN with fewer than 3 perturbations.
    """
    from sklearn.metrics import adjusted_mutual_info_score

    if len(real_centroids) < 3:
        return float("nan")
    try:
        import igraph  # noqa: F401
    except ImportError as err:
        raise ImportError("clustering_agreement needs the igraph package (pip install igraph), as cell-eval "
                          "does for its Leiden clustering.") from err  # fmt: skip
    (real_labels,) = _leiden(real_centroids, [REAL_RESOLUTION])
    best = 0.0
    for labels in _leiden(pred_centroids, PRED_RESOLUTIONS):
        best = max(best, float(adjusted_mutual_info_score(real_labels, labels)))
    return best
