"""``cm.tl.evaluate_perturbation``: score predicted perturbed cells against held-out real cells, next to baselines.

The metrics are cell-eval's (``cellmint.models._perturbation_metrics``, under cell-eval's names) on
log1p-normalised expression, computed within each context (cell-eval's ``--celltype-col``):
pseudobulks, deltas against the control cells of the same object and context, differential
expression against those control cells, ranks among the context's perturbations. The baselines of
:func:`~cellmint.tl.perturbation_baselines` and a split-half replicate of the real cells go through
the same code as the prediction, which places every score on a 0–1 scale
(:mod:`._perturbation_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._utils import _logging as logg
from .._utils._docs import doc_params
from ..models import _perturbation_metrics as pm
from . import _perturbation_scores as scores
from ._perturbation_baselines import BASELINES, NEED_PERTURBATION, perturbation_baselines
from ._perturbation_data import NORMALIZATIONS, LogExpression, cell_groups, median_normalized

FIXED_K = (50, 100, 200, 500)
#: every metric, in table order (cell-eval's names; pearson_delta_top and energy_distance are cellmint's)
METRICS = (
    "pearson_delta", "pearson_delta_top", "mse", "mae", "mse_delta", "mae_delta",
    "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine", "pearson_edistance",
    "overlap_at_N", *(f"overlap_at_{k}" for k in FIXED_K), "overlap_at_k",
    "precision_at_N", *(f"precision_at_{k}" for k in FIXED_K), "precision_at_k",
    "de_nsig", "de_spearman_sig", "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall",
    "pr_auc", "roc_auc", "clustering_agreement", "energy_distance",
)  # fmt: skip
#: metrics that need differential expression of the real cells / of the predicted cells too
NEED_PRED_DE = {m for m in METRICS if m.startswith(("overlap", "precision", "de_"))} | {"pr_auc", "roc_auc"}
NEED_REAL_DE = NEED_PRED_DE | {"pearson_delta_top"}
#: one value per context (over its perturbations), repeated in each of its rows
CONTEXT_METRICS = ("pearson_edistance", "de_spearman_sig", "clustering_agreement")
#: cells per side of the energy distance (larger sets are subsampled with a fixed seed)
ENERGY_MAX_CELLS = 1000


def _columns(top_k: int) -> dict[str, list[str]]:
    """Output columns of each metric."""
    named = {"pearson_delta_top": [f"pearson_delta_top{top_k}", "n_top_genes"], "overlap_at_k": [f"overlap_at_{top_k}"],
             "precision_at_k": [f"precision_at_{top_k}"], "de_nsig": ["de_nsig_real", "de_nsig_pred"]}  # fmt: skip
    return {metric: named.get(metric, [metric]) for metric in METRICS}


def _chosen_metrics(metrics: Sequence[str] | str | None, top_k: int) -> list[str]:
    everything = [m for m in METRICS if not (m.endswith("_at_k") and top_k in FIXED_K)]
    if metrics is None:
        return [m for m in everything if m != "clustering_agreement"]
    if metrics == "all":
        return everything
    aliases = {column: metric for metric, columns in _columns(top_k).items() for column in columns}
    aliases |= {f"overlap_at_{k}": f"overlap_at_{k}" for k in FIXED_K} | {f"precision_at_{k}": f"precision_at_{k}"
                                                                         for k in FIXED_K}  # fmt: skip
    chosen = [aliases.get(m, m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise ValueError(f"Unknown metrics {unknown}; choose among {list(METRICS)}, or None / 'all'.")
    return [m for m in METRICS if m in chosen]


class _Side:
    """Cells grouped by (context, perturbation), read as log1p values over the real genes.

    ``source`` gives, per cell, the name of the control cell it was predicted from (or None);
    ``real_rows`` marks the halves of the real cells, which resample with the real cells themselves.
    """

    def __init__(self, adata: ad.AnnData, genes: pd.Index, *, perturbation_key, context_key, layer, what, kind=None):
        self.expression = LogExpression(adata, genes, layer=layer, what=what, kind=kind)
        self.groups = cell_groups(adata.obs, perturbation_key, context_key, what=what)
        self.names = adata.obs_names.astype(str).to_numpy()
        self.source = adata.obs["source_cell"].astype(str).to_numpy() if "source_cell" in adata.obs else None
        self.real_rows = False

    def subset(self, groups: dict) -> _Side:
        """The same cells, grouped otherwise: a half of the real cells (the replicate ceiling)."""
        side = object.__new__(_Side)
        side.expression, side.groups, side.names = self.expression, groups, self.names
        side.source, side.real_rows = None, True
        return side


def _check_pairs(real: dict, pred: dict, control: str) -> list[tuple[str, str]]:
    real_pairs = {k for k in real if k[1] != control}
    pred_pairs = {k for k in pred if k[1] != control}
    for missing, where in ((pred_pairs - real_pairs, "real"), (real_pairs - pred_pairs, "pred")):
        if missing:
            raise ValueError(f"{len(missing)} (context, perturbation) pairs have no cells in {where}: "
                             f"{sorted(missing)[:10]}.")  # fmt: skip
    if not real_pairs:
        raise ValueError(f"real has no perturbed cells (every cell is labelled {control!r}).")
    lacking = sorted({c for c, _ in real_pairs if (c, control) not in real and (c, control) not in pred})
    if lacking:
        raise ValueError(f"No control cells ({control!r}) in real or pred for the contexts {lacking[:10]}.")
    return sorted(real_pairs)


class _Draws:
    """Bootstrap weights of one context's real cells: its control cells, and each perturbation's cells apart."""

    def __init__(self, rng: np.random.Generator, n_bootstrap: int, control_names: np.ndarray, groups: dict):
        self.rng, self.n_bootstrap = rng, n_bootstrap
        self.control = scores.draw_weights(rng, len(control_names), n_bootstrap)
        self.control_index = {name: i for i, name in enumerate(control_names)}
        self.pert = {p: scores.draw_weights(rng, len(rows), n_bootstrap) for p, rows in groups.items()}
        self.position = {p: {row: i for i, row in enumerate(rows)} for p, rows in groups.items()}

    def of(self, side: _Side, rows: np.ndarray, perturbation: str | None) -> np.ndarray:
        """Weights of a method's cells (replicates × cells): their control cells', their own, or fresh draws."""
        if perturbation is None and side.real_rows:
            return self.control
        if side.real_rows:
            return self.pert[perturbation][:, [self.position[perturbation][r] for r in rows]]
        if side.source is not None:
            where = [self.control_index.get(s, -1) for s in side.source[rows]]
            if min(where, default=-1) >= 0:
                return self.control[:, where]
        return scores.draw_weights(self.rng, len(rows), self.n_bootstrap)


class _Context:
    """What every method of one context is compared with: control cells, pseudobulks, deltas, DE, resampled bulks."""

    def __init__(self, real: _Side, pred: _Side, context: str, perturbations: list[str], control: str, chosen,
                 top_k: int, genes: pd.Index, draws: _Draws | None):  # fmt: skip
        with_controls = real if (context, control) in real.groups else pred
        self.control = with_controls.expression.rows(with_controls.groups[(context, control)])
        self.precision = real.expression.precision
        self.genes, self.perturbations, self.chosen, self.top_k = genes, perturbations, chosen, top_k
        self.bulk, self.delta, self.de, self.cells, self.sample, self.n = {}, {}, {}, {}, {}, {}
        self.draws, self.resampled = draws, {}
        control_bulk = self.control.mean(axis=0)
        for p in perturbations:
            rows = real.groups[(context, p)]
            cells = real.expression.rows(rows)
            self.cells[p], self.n[p] = cells, len(cells)
            self.bulk[p] = cells.mean(axis=0)
            self.delta[p] = self.bulk[p] - control_bulk
            if NEED_REAL_DE & set(chosen):
                de = pm.differential_expression(cells, self.control)
                self.de[p] = {**de, "significant": pm.significant_genes(de), "top": pm.top_genes(de, top_k)}
            if draws is not None:
                weights = draws.of(real, rows, p) if real.real_rows else draws.pert[p]
                self.resampled[p] = {"weights": weights, "bulk": scores.weighted_means(weights, cells)}
        if draws is not None:
            self.control_bulk_b = scores.weighted_means(draws.control, self.control)

    def energy_sample(self, p: str) -> tuple[np.ndarray, np.ndarray]:
        """The real cells of ``p`` the energy distance uses (≤ ENERGY_MAX_CELLS, fixed seed) and their positions."""
        if p not in self.sample:
            self.sample[p] = _energy_rows(self.cells[p])
        return self.sample[p]


def _energy_rows(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pm.energy_distance's subsample of a set of cells (same seed), with the rows kept."""
    keep = np.arange(len(cells))
    if len(cells) > ENERGY_MAX_CELLS:
        keep = np.sort(np.random.default_rng(0).choice(len(cells), ENERGY_MAX_CELLS, replace=False))
    return cells[keep], keep


def _method_rows(method: str, side: _Side, real: _Context, context: str, control: str) -> tuple[list, dict]:
    """The metric rows of one method in one context, and its bootstrap replicates ``{perturbation: {column: B}}``."""
    chosen, top_k, perturbations, draws = real.chosen, real.top_k, real.perturbations, real.draws
    rows = side.groups.get((context, control))
    control_cells = side.expression.rows(rows) if rows is not None else real.control
    control_bulk = control_cells.mean(axis=0)
    if draws is not None:
        control_weights = draws.of(side, rows, None) if rows is not None else draws.control
        control_bulk_b = scores.weighted_means(control_weights, control_cells)
    records, deltas, replicates, sets, de_counts, centroids = [], [], {}, [], [], []
    for p in perturbations:
        members = side.groups[(context, p)]
        cells = side.expression.rows(members)
        bulk = cells.mean(axis=0)
        delta = bulk - control_bulk
        deltas.append(delta)
        sets.append(cells)
        centroids.append(bulk)
        record = {"method": method, "context": context, "perturbation": p, "n_real": real.n[p], "n_pred": len(cells),
                  "n_control": len(real.control)}  # fmt: skip
        if "pearson_delta" in chosen:
            record["pearson_delta"] = pm.pearson(delta, real.delta[p])
        if "pearson_delta_top" in chosen:
            top = real.de[p]["top"]
            record[f"pearson_delta_top{top_k}"] = pm.pearson(delta[top], real.delta[p][top])
            record["n_top_genes"] = len(top)
        for metric, error in {"mse": pm.mean_squared_error, "mae": pm.mean_absolute_error}.items():
            if metric in chosen:  # cell-eval's mse/mae compare pseudobulks, *_delta the deltas
                record[metric] = error(bulk, real.bulk[p])
            if f"{metric}_delta" in chosen:
                record[f"{metric}_delta"] = error(delta, real.delta[p])
        if NEED_PRED_DE & set(chosen):
            de_counts.append(_de_metrics(record, real.de[p], pm.differential_expression(cells, control_cells),
                                         chosen, top_k))  # fmt: skip
        if "energy_distance" in chosen:
            real_cells, _ = real.energy_sample(p)
            record["energy_distance"] = pm.energy_distance(cells, real_cells, max_cells=ENERGY_MAX_CELLS)
        if draws is not None:
            replicates[p] = _replicates(real, p, cells, draws.of(side, members, p), control_bulk_b)
        records.append(record)
    for distance in ("l1", "l2", "cosine"):
        if f"discrimination_score_{distance}" in chosen:
            real_deltas = np.stack([real.delta[p] for p in perturbations])
            values = pm.discrimination_scores(real_deltas, np.stack(deltas), real.genes, perturbations, distance)
            for record, value in zip(records, values, strict=True):
                record[f"discrimination_score_{distance}"] = value if len(perturbations) > 1 else np.nan
    context_values = {}
    if "pearson_edistance" in chosen:
        # distances in the precision each object's values are held in (float32 for cell-eval's normalisation)
        real_type, pred_type = real.precision, side.expression.precision
        context_values["pearson_edistance"] = pm.pearson_edistance(
            [real.cells[p].astype(real_type) for p in perturbations], real.control.astype(real_type),
            [cells.astype(pred_type) for cells in sets], control_cells.astype(pred_type))  # fmt: skip
    if "de_spearman_sig" in chosen:
        counts = np.asarray(de_counts, dtype=np.float64).reshape(-1, 2)
        context_values["de_spearman_sig"] = pm.de_spearman_sig(counts[:, 0], counts[:, 1])
    if "clustering_agreement" in chosen:
        context_values["clustering_agreement"] = pm.clustering_agreement(
            np.stack([real.bulk[p] for p in perturbations]), np.stack(centroids)
        )
    for record in records:
        record.update(context_values)
    return records, replicates


def _de_metrics(record: dict, real_de: dict, pred_de: dict, chosen, top_k: int) -> tuple[int, int]:
    """The DE-based metrics of one row (written to ``record``); returns the numbers of significant genes."""
    real_top, pred_top = real_de["significant"], pm.significant_genes(pred_de)
    for kind in ("overlap", "precision"):
        for k in ("N", *FIXED_K, top_k):
            column = f"{kind}_at_{k}"
            if (column in chosen or (k == top_k and f"{kind}_at_k" in chosen)) and column not in record:
                record[column] = pm.overlap(real_top, pred_top, None if k == "N" else k, metric=kind)
    if "de_nsig" in chosen:
        record["de_nsig_real"], record["de_nsig_pred"] = len(real_top), len(pred_top)
    for metric, function in (("de_direction_match", pm.de_direction_match),
                             ("de_spearman_lfc_sig", pm.de_spearman_lfc_sig),
                             ("de_sig_genes_recall", pm.de_sig_genes_recall)):  # fmt: skip
        if metric in chosen:
            record[metric] = function(real_de, pred_de)
    for kind in ("pr", "roc"):
        if f"{kind}_auc" in chosen:
            record[f"{kind}_auc"] = pm.significance_auc(real_de, pred_de, kind)
    return len(real_top), len(pred_top)


def _replicates(real: _Context, p: str, cells: np.ndarray, weights: np.ndarray, control_bulk_b) -> dict:
    """Bootstrap values of one method's resampled metrics for perturbation ``p``."""
    chosen, top_k = real.chosen, real.top_k
    named = {m: (f"pearson_delta_top{top_k}" if m == "pearson_delta_top" else m) for m in scores.BOOTSTRAP_METRICS
             if m in chosen and m != "energy_distance"}  # fmt: skip
    top = real.de[p]["top"] if "pearson_delta_top" in named else None
    out = scores.bulk_replicates(scores.weighted_means(weights, cells), control_bulk_b, real.resampled[p]["bulk"],
                                 real.control_bulk_b, top, named)  # fmt: skip
    if "energy_distance" in chosen:
        real_cells, keep = real.energy_sample(p)
        real_weights = real.resampled[p]["weights"][:, keep]
        if "yy" not in real.resampled[p]:
            real.resampled[p]["yy"] = scores.self_term(real_cells, real_weights)
        pred_cells, pred_keep = _energy_rows(cells)
        out["energy_distance"] = scores.energy_replicates(pred_cells, real_cells, weights[:, pred_keep], real_weights,
                                                          real.resampled[p]["yy"])  # fmt: skip
    return out


def _ceiling(full: _Side, pred: _Side, real: _Context, context: str, control: str, rng) -> tuple[list, dict]:
    """The replicate ceiling's rows: one half of each pair's real cells, as a prediction, scored against the other.

    Pairs with fewer than 4 real cells are left out. Both halves keep the context's control cells.
    The scaled scores turn these split-half scores into the ceiling (:func:`._perturbation_scores.noise_ceiling`).
    """
    first, second = {}, {}
    for p in real.perturbations:
        rows = full.groups[(context, p)]
        halves = scores.split_halves(rows, rng)
        if halves is not None:
            first[(context, p)], second[(context, p)] = halves
    kept = [p for c, p in first]
    if not kept:
        return [], {}
    for groups in (first, second):
        if (context, control) in full.groups:
            groups[(context, control)] = full.groups[(context, control)]
    half_real = _Context(full.subset(second), pred, context, kept, control, real.chosen, real.top_k, real.genes,
                         real.draws)  # fmt: skip
    records, replicates = _method_rows(scores.CEILING, full.subset(first), half_real, context, control)
    for record in records:
        record["n_real"] = real.n[record["perturbation"]]
    return records, replicates


def _log_values(adata: ad.AnnData | None, layer: str | None, normalization: str, what: str):
    """The object and layer to read: cell-eval's normalisation makes a log1p copy of counts; cellmint's reads as is."""
    if adata is None or normalization == "cellmint":
        return adata, layer
    return median_normalized(adata, layer=layer, what=what), None


@doc_params()
def evaluate_perturbation(
    pred: ad.AnnData | Mapping[str, ad.AnnData],
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control: str,
    context_key: str | None = None,
    train: ad.AnnData | None = None,
    baselines: Sequence[str] = BASELINES,
    metrics: Sequence[str] | str | None = None,
    top_k: int = 100,
    normalize_to: str | None = "perturbation_mean",
    ceiling: bool = True,
    n_bootstrap: int = 100,
    level: float = 0.95,
    normalization: str = "cellmint",
    name: str = "model",
    layer: str | None = None,
    random_state: int = 0,
) -> pd.DataFrame:
    """Compare predicted perturbed cells with held-out real ones, per context and perturbation, on a 0–1 scale.

    Every metric is computed for the prediction, for each simple baseline fitted on ``train``, and
    for a split-half *replicate* of the real cells; ``<metric>_scaled`` then places the prediction
    between the best baseline (0) and the replicate (1), with bootstrap intervals over cells (see
    :doc:`/perturbation`, "How to read perturbation scores").

    All metrics are computed on log1p-normalised expression (cell-eval's space). Raw counts in
    ``pred``, ``real`` or ``train`` are normalised on a copy, with ``normalization``: ``"cellmint"``
    (default) ``log1p(10,000 · x / library size)``, cellmint's one recipe; ``"cell-eval"``
    ``log1p(median library size · x / library size)``, with the median over each object's cells, as
    cell-eval does (use it to compare with published cell-eval tables). Log-normalised values are used
    as they are either way. Genes are matched by name (``var_names``) on the genes of ``real``.

    Everything is done within each context, as cell-eval's ``--celltype-col`` does: a *pseudobulk*
    is the mean log1p value of each gene over a perturbation's cells; a *delta* is a pseudobulk
    minus the control pseudobulk of the same object and context (prediction deltas use the
    prediction's control cells, and the real control cells where the prediction has none for a
    context); differential expression (DE) tests each gene, perturbed cells against those control
    cells (two-sided Mann–Whitney U, Benjamini–Hochberg FDR across genes; significant: FDR < 0.05,
    ranked by absolute log2 fold change). Metrics (cell-eval's names; columns in parentheses):

    - ``pearson_delta``: Pearson correlation of predicted and real deltas over all genes (best 1);
    - ``pearson_delta_top`` (``pearson_delta_top{{top_k}}``, ``n_top_genes``): the same over the real
      top ``top_k`` DE genes (the significant genes of largest |log2FC|; fewer than ``top_k``
      significant: the ``top_k`` of lowest p-value);
    - ``mse``, ``mae``: errors of the pseudobulks; ``mse_delta``, ``mae_delta``: of the deltas (best 0);
    - ``discrimination_score_l1``, ``_l2``, ``_cosine``: ``1 − rank/N``, the rank of the true
      perturbation among the context's ``N`` real deltas by distance to the predicted delta (the gene
      named like the perturbation left out; ties count half; NaN with one perturbation; best 1);
    - ``pearson_edistance``: Pearson, over the context's perturbations, of the real and predicted
      energy distances from control (all cells; best 1);
    - ``overlap_at_N``, ``overlap_at_50`` … ``_500``, ``precision_at_N`` … ``_500`` (and
      ``_at_{{top_k}}``): shared share of the ranked significant genes (best 1);
    - ``de_nsig`` (``de_nsig_real``, ``de_nsig_pred``): numbers of significant genes;
    - ``de_spearman_sig``: Spearman, over the context's perturbations, of the numbers of significant
      genes; ``de_direction_match``: share of the real significant genes changed in the same
      direction; ``de_spearman_lfc_sig``: Spearman of their log2FC; ``de_sig_genes_recall``: share of
      them significant in the prediction too; ``pr_auc``, ``roc_auc``: how well the predicted FDRs
      rank the real significant genes (best 1);
    - ``clustering_agreement`` (only with ``metrics="all"`` or by name; needs ``igraph``): best
      adjusted mutual information between Leiden clusters of the real and predicted pseudobulks;
    - ``energy_distance``: between the predicted and real perturbed cells (V-statistic, Euclidean,
      at most 1,000 cells per side drawn with a fixed seed; best 0).

    ``pearson_edistance``, ``de_spearman_sig`` and ``clustering_agreement`` have one value per
    context, repeated in each of its rows. Where the definitions coincide the values are cell-eval
    0.8.2's to 1e-6 (``benchmarks/celleval_parity.py``).

    Parameters
    ----------
    pred
        Predicted cells, as :func:`~cellmint.tl.predict_perturbation` returns them:
        ``obs[perturbation_key]`` (and ``obs[context_key]``), the control cells of each context
        included (recognised by their label); ``obs["source_cell"]`` (the control cell each was
        predicted from), when present, pairs them with the real control cells in the bootstrap.
        A mapping ``{{name: AnnData}}`` scores several predictions (e.g. ablations) next to the same
        baselines, replicate and bootstrap draws; their rows have ``method`` set to the name.
    real
        Held-out real cells: the perturbed cells and the control cells of the same contexts. Its
        ``(context, perturbation)`` pairs must be those of ``pred``; each of its genes must be in
        ``pred``.
    perturbation_key
        ``obs`` column of the perturbation labels.
    control
        The label of control cells in ``obs[perturbation_key]``.
    context_key
        ``obs`` column of the context (cell line, patient, donor); ``None``: one context, ``"all"``.
    train
        Training cells (controls and perturbed cells of the training contexts), which the
        ``perturbation_mean``, ``context_mean`` and ``linear`` baselines learn from. ``None``: only
        the ``control`` baseline is computed.
    baselines
        Baselines scored next to the prediction (see :func:`~cellmint.tl.perturbation_baselines`);
        their rows have ``method`` set to the baseline's name. ``()`` for none (then no scaled scores).
    metrics
        Metrics to compute (names above); ``None``: all but ``clustering_agreement``; ``"all"``: all.
    top_k
        Number of top DE genes of ``pearson_delta_top`` (and of ``overlap_at_k``/``precision_at_k``).
    normalize_to
        Baseline of the ``<metric>_score`` columns (cell-eval's baseline-normalised score; kept
        beside the 0–1 scale for comparison with cell-eval). ``None``: no such columns. Without
        ``train``, relative to the ``control`` baseline.
    ceiling
        Add the split-half replicate (``method == "replicate"``: each pair's real cells split at
        random into two disjoint halves, one scored against the other; pairs under 4 cells left out)
        and the ``<metric>_scaled`` columns, whose 1 is the score the true response would get,
        estimated from the split halves (:func:`~cellmint.tl._perturbation_scores.noise_ceiling`).
    n_bootstrap
        Bootstrap replicates over cells for the intervals (0: none). The real control and perturbed
        cells are drawn again with replacement; a prediction made from a control cell follows it.
        Resampled: ``pearson_delta``, ``pearson_delta_top``, ``mse``, ``mae``, ``mse_delta``,
        ``mae_delta``, ``energy_distance``.
    level
        Coverage of the bootstrap intervals (the replicates' central share, centred on the value).
    normalization
        ``"cellmint"`` or ``"cell-eval"``: how counts become log1p values (see above).
    name
        ``method`` of the prediction's rows (a single ``pred``).
    {doc_layer} Read from ``pred``, ``real`` and ``train``.
    {doc_random_state} Draws the halves and the bootstrap replicates.

    Returns
    -------
    One row per (method, context, perturbation): the prediction(s) (``method == name``), each
    baseline, then ``"replicate"``. Columns ``method``, ``context``, ``perturbation``, ``n_real``,
    ``n_pred`` and ``n_control`` (cells), the metric columns above, then for each metric with a best
    value:

    - ``<column>_scaled``: ``(value − best baseline) / (ceiling − best baseline)`` with the best
      baseline and the ceiling of the same context and perturbation: 0 = the best simple baseline,
      1 = the true response (as estimated from the split halves), negative = worse than a
      baseline; NaN where the ceiling is not better than the best baseline;
    - ``<column>_low``, ``<column>_high``, ``<column>_scaled_low``, ``<column>_scaled_high``: bootstrap
      intervals (resampled metrics, ``n_bootstrap > 0``);
    - ``<column>_score``: cell-eval's score against ``normalize_to``, ``1 − value/baseline`` (best 0)
      or ``(value − baseline)/(1 − baseline)`` (best 1), not clipped.

    ``DataFrame.attrs`` holds ``top_k``, ``normalize_to``, ``baselines``, ``normalization``,
    ``level`` and ``bootstrap`` (``{{(method, context, perturbation): {{column: replicate values}}}}``),
    which :func:`~cellmint.tl.perturbation_summary` pools.
    """
    chosen = _chosen_metrics(metrics, top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be a positive number of genes, not {top_k!r}.")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}.")
    if n_bootstrap < 0 or not 0 < level < 1:
        raise ValueError(f"n_bootstrap must be >= 0 and level in (0, 1); got {n_bootstrap!r} and {level!r}.")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines must be among {BASELINES}, not {unknown}.")
    if not baselines:
        normalize_to = None
    if train is None:
        baselines = [b for b in baselines if b == "control"]
        if normalize_to in (*NEED_PERTURBATION, "context_mean"):
            normalize_to = "control"
    predictions = dict(pred) if isinstance(pred, Mapping) else {name: pred}
    if not predictions:
        raise ValueError("pred is an empty mapping: pass predicted cells.")
    for method in predictions:
        if method in (*BASELINES, scores.CEILING):
            raise ValueError(f"The prediction name {method!r} is the name of a baseline or of the replicate; "
                             "choose another name.")  # fmt: skip
    if normalize_to is not None and normalize_to not in baselines:
        raise ValueError(f"normalize_to={normalize_to!r} is not among the baselines computed {list(baselines)}.")
    control = str(control)
    genes = pd.Index(real.var_names.astype(str))
    real, real_layer = _log_values(real, layer, normalization, "real")
    train, _ = _log_values(train, layer, normalization, "train")
    keys = {"perturbation_key": perturbation_key, "context_key": context_key}
    real_side = _Side(real, genes, **keys, layer=real_layer, what="real")
    methods = {}
    for method, adata in predictions.items():
        what = "pred" if len(predictions) == 1 else f"pred[{method!r}]"
        adata, pred_layer = _log_values(adata, layer, normalization, what)
        methods[method] = _Side(adata, genes, **keys, layer=pred_layer, what=what)
        pairs = _check_pairs(real_side.groups, methods[method].groups, control)
    pred_side = next(iter(methods.values()))
    start = logg.info(f"evaluating {len(pairs)} predicted perturbations against {len(baselines)} baselines")
    if baselines:
        is_control = real.obs[perturbation_key].astype(str).to_numpy() == control
        predicted = perturbation_baselines(train, real[is_control], pairs, perturbation_key=perturbation_key,
                                           control=control, context_key=context_key, baselines=baselines,
                                           layer=real_layer)  # fmt: skip
        for baseline, adata in predicted.items():
            methods[baseline] = _Side(adata, genes, **keys, layer=None, what=f"the {baseline} baseline", kind="lognorm")
    rng = np.random.default_rng(random_state)
    records, replicates = {method: [] for method in [*methods, scores.CEILING]}, scores.Replicates()
    for context in dict.fromkeys(c for c, _ in pairs):
        perturbations = [p for c, p in pairs if c == context]
        draws = None
        if n_bootstrap:
            with_controls = real_side if (context, control) in real_side.groups else pred_side
            names = with_controls.names[with_controls.groups[(context, control)]]
            draws = _Draws(rng, n_bootstrap, names, {p: real_side.groups[(context, p)] for p in perturbations})
        summary = _Context(real_side, pred_side, context, perturbations, control, chosen, top_k, genes, draws)
        for method, side in methods.items():
            rows, boot = _method_rows(method, side, summary, context, control)
            records[method] += rows
            replicates.update({(method, context, p): values for p, values in boot.items()})
        if ceiling:
            rows, boot = _ceiling(real_side, pred_side, summary, context, control, rng)
            records[scores.CEILING] += rows
            replicates.update({(scores.CEILING, context, p): values for p, values in boot.items()})
    columns = ["method", "context", "perturbation", "n_real", "n_pred", "n_control"]
    columns += [column for metric in chosen for column in _columns(top_k)[metric]]
    table = pd.DataFrame([r for method in records for r in records[method]], columns=columns)
    metric_columns = [c for c in columns[6:] if scores.best_value(c, top_k) is not None]
    if (ceiling and baselines) or n_bootstrap:
        table = scores.add_scaled(table, metric_columns, list(baselines), replicates, top_k, level)
    if normalize_to is not None:
        table = _add_scores(table, normalize_to, metric_columns, top_k)
    table.attrs.update({"top_k": top_k, "normalize_to": normalize_to, "baselines": list(baselines),
                        "normalization": normalization, "level": level, "bootstrap": replicates})  # fmt: skip
    logg.info("    finished", time=start)
    return table


def _add_scores(table: pd.DataFrame, normalize_to: str, columns: list[str], top_k: int) -> pd.DataFrame:
    reference = table[table["method"] == normalize_to].set_index(["context", "perturbation"])
    keys = pd.MultiIndex.from_frame(table[["context", "perturbation"]])
    values = {}
    for column in columns:
        baseline = reference[column].reindex(keys).to_numpy()
        values[f"{column}_score"] = pm.normalized_score(table[column], baseline, scores.best_value(column, top_k))
    return pd.concat([table, pd.DataFrame(values, index=table.index)], axis=1)
