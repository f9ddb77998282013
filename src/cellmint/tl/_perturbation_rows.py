"""Scoring every method of one context: the cells compared, the metric rows, the resampled bulks, the halves.

:func:`cellmint.tl.evaluate_perturbation` builds one :class:`Context` per context (the real cells every
method is compared with, their DE and their bootstrap draws) and calls :func:`method_rows` for each
prediction and baseline, and :func:`ceiling_rows` for the split-half replicate.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._metrics import _perturbation as pm
from . import _perturbation_scores as scores
from ._perturbation_data import LogExpression, cell_groups

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


class Side:
    """Cells grouped by (context, perturbation), read as log1p values over the real genes.

    ``source`` gives, per cell, the name of the control cell it was predicted from (or None);
    ``real_rows`` marks the halves of the real cells, which resample with the real cells themselves.
    """

    def __init__(self, adata: ad.AnnData, genes: pd.Index, *, perturbation_key, context_key, layer, what, kind=None):
        self.expression = LogExpression(adata, genes, layer=layer, what=what, kind=kind)
        self.groups = cell_groups(adata.obs, perturbation_key, context_key, what=what)
        self.names = adata.obs_names.astype(str).to_numpy()
        self.source = (
            adata.obs[Key.obs.source_cell].astype(str).to_numpy() if Key.obs.source_cell in adata.obs else None
        )
        self.real_rows = False

    def subset(self, groups: dict) -> Side:
        """The same cells, grouped otherwise: a half of the real cells (the replicate ceiling)."""
        side = object.__new__(Side)
        side.expression, side.groups, side.names = self.expression, groups, self.names
        side.source, side.real_rows = None, True
        return side


def check_pairs(real: dict, pred: dict, control: str) -> list[tuple[str, str]]:
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


class Draws:
    """Bootstrap weights of one context's real cells: its control cells, and each perturbation's cells apart."""

    def __init__(self, rng: np.random.Generator, n_bootstrap: int, control_names: np.ndarray, groups: dict):
        self.rng, self.n_bootstrap = rng, n_bootstrap
        self.control = scores.draw_weights(rng, len(control_names), n_bootstrap)
        self.control_index = {name: i for i, name in enumerate(control_names)}
        self.pert = {p: scores.draw_weights(rng, len(rows), n_bootstrap) for p, rows in groups.items()}
        self.position = {p: {row: i for i, row in enumerate(rows)} for p, rows in groups.items()}

    def of(self, side: Side, rows: np.ndarray, perturbation: str | None) -> np.ndarray:
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


class Context:
    """What every method of one context is compared with: control cells, pseudobulks, deltas, DE, resampled bulks."""

    def __init__(self, real: Side, pred: Side, context: str, perturbations: list[str], control: str, chosen,
                 top_k: int, genes: pd.Index, draws: Draws | None):  # fmt: skip
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


def method_rows(method: str, side: Side, real: Context, context: str, control: str) -> tuple[list, dict]:
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
        record = {Key.table.method: method, Key.table.context: context, Key.table.perturbation: p,
                  "n_real": real.n[p], "n_pred": len(cells), "n_control": len(real.control)}  # fmt: skip
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


def _replicates(real: Context, p: str, cells: np.ndarray, weights: np.ndarray, control_bulk_b) -> dict:
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


def ceiling_rows(full: Side, pred: Side, real: Context, context: str, control: str, rng) -> tuple[list, dict]:
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
    half_real = Context(full.subset(second), pred, context, kept, control, real.chosen, real.top_k, real.genes,
                         real.draws)  # fmt: skip
    records, replicates = method_rows(scores.CEILING, full.subset(first), half_real, context, control)
    for record in records:
        record["n_real"] = real.n[record["perturbation"]]
    return records, replicates
