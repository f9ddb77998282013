"""``cm.tl.evaluate_perturbation``: score predicted perturbed cells against held-out real cells, next to baselines.

The metrics are cell-eval's (``cellmint.models._perturbation_metrics``) on log1p-normalised
expression, computed within each context (cell-eval's ``--celltype-col``): pseudobulks, deltas
against the control cells of the same object and context, differential expression against those
control cells, and the discrimination rank among the context's perturbations. The baselines of
:func:`~cellmint.tl.perturbation_baselines` go through the same code as the prediction, and each
metric with a best value is also given as a score relative to one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._utils import _logging as logg
from .._utils._docs import doc_params
from ..models import _perturbation_metrics as pm
from ._perturbation_baselines import BASELINES, NEED_PERTURBATION, perturbation_baselines
from ._perturbation_data import LogExpression, cell_groups

METRICS = (
    "pearson_delta",
    "pearson_delta_top",
    "mse",
    "mae",
    "mse_delta",
    "mae_delta",
    "discrimination_score_l1",
    "overlap_at_N",
    "overlap_at_k",
    "precision_at_N",
    "precision_at_k",
    "de_nsig",
    "energy_distance",
)
#: metrics that need differential expression of the real cells / of the predicted cells too
NEED_REAL_DE = {"pearson_delta_top", "overlap_at_N", "overlap_at_k", "precision_at_N", "precision_at_k", "de_nsig"}
NEED_PRED_DE = NEED_REAL_DE - {"pearson_delta_top"}
#: cells per side of the energy distance (larger sets are subsampled with a fixed seed)
ENERGY_MAX_CELLS = 1000


def _columns(top_k: int) -> dict[str, list[str]]:
    """Output columns of each metric."""
    named = {"pearson_delta_top": [f"pearson_delta_top{top_k}", "n_top_genes"], "overlap_at_k": [f"overlap_at_{top_k}"],
             "precision_at_k": [f"precision_at_{top_k}"], "de_nsig": ["de_nsig_real", "de_nsig_pred"]}  # fmt: skip
    return {metric: named.get(metric, [metric]) for metric in METRICS}


def _chosen_metrics(metrics: Sequence[str] | None, top_k: int) -> list[str]:
    if metrics is None:
        return list(METRICS)
    aliases = {column: metric for metric, columns in _columns(top_k).items() for column in columns}
    chosen = [aliases.get(m, m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise ValueError(f"Unknown metrics {unknown}; choose among {list(METRICS)}.")
    return [m for m in METRICS if m in chosen]


class _Side:
    """One object's cells, grouped by (context, perturbation), read as log1p values over the real genes."""

    def __init__(self, adata: ad.AnnData, genes: pd.Index, *, perturbation_key, context_key, layer, what, kind=None):
        self.expression = LogExpression(adata, genes, layer=layer, what=what, kind=kind)
        self.groups = cell_groups(adata.obs, perturbation_key, context_key, what=what)


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


def _real_summary(real: _Side, pred: _Side, context: str, perturbations: list[str], control: str, chosen, top_k,
                  genes: pd.Index) -> dict:  # fmt: skip
    """What every method is compared with in one context: control cells, pseudobulks, deltas, DE, cell samples."""
    with_controls = real if (context, control) in real.groups else pred
    control_cells = with_controls.expression.rows(with_controls.groups[(context, control)])
    summary = {"control": control_cells, "genes": genes, "bulk": {}, "delta": {}, "de": {}, "cells": {}, "n": {}}
    control_bulk = control_cells.mean(axis=0)
    for p in perturbations:
        cells = real.expression.rows(real.groups[(context, p)])
        summary["n"][p] = len(cells)
        summary["bulk"][p] = cells.mean(axis=0)
        summary["delta"][p] = summary["bulk"][p] - control_bulk
        if "energy_distance" in chosen:
            summary["cells"][p] = pm.subsample(cells, ENERGY_MAX_CELLS)
        if NEED_REAL_DE & set(chosen):
            de = pm.differential_expression(cells, control_cells)
            summary["de"][p] = {**de, "significant": pm.significant_genes(de), "top": pm.top_genes(de, top_k)}
    return summary


def _method_rows(method: str, side: _Side, real: dict, context: str, perturbations, control, chosen, top_k) -> list:
    rows = side.groups.get((context, control))
    control_cells = side.expression.rows(rows) if rows is not None else real["control"]
    control_bulk = control_cells.mean(axis=0)
    records, deltas = [], []
    for p in perturbations:
        cells = side.expression.rows(side.groups[(context, p)])
        bulk = cells.mean(axis=0)
        delta = bulk - control_bulk
        deltas.append(delta)
        record = {"method": method, "context": context, "perturbation": p, "n_real": real["n"][p], "n_pred": len(cells)}
        if "pearson_delta" in chosen:
            record["pearson_delta"] = pm.pearson(delta, real["delta"][p])
        if "pearson_delta_top" in chosen:
            top = real["de"][p]["top"]
            record[f"pearson_delta_top{top_k}"] = pm.pearson(delta[top], real["delta"][p][top])
            record["n_top_genes"] = len(top)
        errors = {"mse": pm.mean_squared_error, "mae": pm.mean_absolute_error}
        for metric, error in errors.items():  # cell-eval's mse/mae compare pseudobulks, *_delta the deltas
            if metric in chosen:
                record[metric] = error(bulk, real["bulk"][p])
            if f"{metric}_delta" in chosen:
                record[f"{metric}_delta"] = error(delta, real["delta"][p])
        if NEED_PRED_DE & set(chosen):
            real_top = real["de"][p]["significant"]
            pred_de = pm.differential_expression(cells, control_cells)
            pred_top = pm.significant_genes(pred_de)
            for name, column, k, kind in (("overlap_at_N", "overlap_at_N", None, "overlap"),
                                          ("overlap_at_k", f"overlap_at_{top_k}", top_k, "overlap"),
                                          ("precision_at_N", "precision_at_N", None, "precision"),
                                          ("precision_at_k", f"precision_at_{top_k}", top_k, "precision")):  # fmt: skip
                if name in chosen:
                    record[column] = pm.overlap(real_top, pred_top, k, metric=kind)
            if "de_nsig" in chosen:
                record["de_nsig_real"], record["de_nsig_pred"] = len(real_top), len(pred_top)
        if "energy_distance" in chosen:
            record["energy_distance"] = pm.energy_distance(cells, real["cells"][p], max_cells=ENERGY_MAX_CELLS)
        records.append(record)
    if "discrimination_score_l1" in chosen:
        real_deltas = np.stack([real["delta"][p] for p in perturbations])
        scores = pm.discrimination_scores(real_deltas, np.stack(deltas), real["genes"], perturbations)
        for record, score in zip(records, scores, strict=True):
            record["discrimination_score_l1"] = score if len(perturbations) > 1 else np.nan
    return records


def _add_scores(table: pd.DataFrame, normalize_to: str, top_k: int) -> pd.DataFrame:
    reference = table[table["method"] == normalize_to].set_index(["context", "perturbation"])
    keys = pd.MultiIndex.from_frame(table[["context", "perturbation"]])
    best = {column: pm.BEST_VALUE[metric] for metric, columns in _columns(top_k).items() for column in columns
            if metric in pm.BEST_VALUE and column != "n_top_genes"}  # fmt: skip
    scores = {
        f"{column}_score": pm.normalized_score(table[column], reference[column].reindex(keys).to_numpy(), value)
        for column, value in best.items()
        if column in table
    }
    return pd.concat([table, pd.DataFrame(scores, index=table.index)], axis=1)


@doc_params()
def evaluate_perturbation(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control: str,
    context_key: str | None = None,
    train: ad.AnnData | None = None,
    baselines: Sequence[str] = BASELINES,
    metrics: Sequence[str] | None = None,
    top_k: int = 100,
    normalize_to: str | None = "perturbation_mean",
    name: str = "model",
    layer: str | None = None,
) -> pd.DataFrame:
    """Compare predicted perturbed cells with held-out real ones, per context and perturbation, next to baselines.

    All metrics are computed on log1p-normalised expression (cell-eval's space): raw counts in
    ``pred``, ``real`` or ``train`` are normalised (``log1p(10,000 · x / library size)``, on a copy;
    cell-eval normalises integer input in place, to the median library size); log-normalised values
    are used as they are. Genes are matched by name (``var_names``) on the genes of ``real``.

    Everything is done within each context, as cell-eval's ``--celltype-col`` does: a *pseudobulk*
    is the mean log1p value of each gene over a perturbation's cells; a *delta* is a pseudobulk
    minus the control pseudobulk of the same object and context (prediction deltas use the
    prediction's control cells, and the real control cells where the prediction has none for a
    context; real deltas likewise fall back to the prediction's control cells); differential
    expression (DE) tests each gene, perturbed cells against those control cells (two-sided
    Mann–Whitney U, Benjamini–Hochberg FDR across genes; significant: FDR < 0.05, ranked by
    absolute log2 fold change).

    Metrics (the ``metrics`` names; columns in parentheses):

    - ``pearson_delta``: Pearson correlation of predicted and real deltas over all genes (best 1);
    - ``pearson_delta_top`` (``pearson_delta_top{{top_k}}``, ``n_top_genes``): the same over the
      real top ``top_k`` DE genes: the ``top_k`` significant genes of largest absolute log2FC, or, when
      fewer than ``top_k`` genes are significant (see ``de_nsig_real``), the ``top_k`` genes of
      lowest p-value; ``n_top_genes`` is the number of genes used;
    - ``mse``, ``mae``: mean squared / absolute error of the pseudobulks (not of the deltas; best 0);
    - ``mse_delta``, ``mae_delta``: the same on the deltas (best 0);
    - ``discrimination_score_l1``: ``1 − rank/N`` where rank counts the real deltas of the context's
      ``N`` perturbations closer (L1, leaving out the gene named like the perturbation) to the
      predicted delta than its own real delta (best 1, worst ``1/N``; NaN for a context with one
      perturbation);
    - ``overlap_at_N``, ``overlap_at_k`` (``overlap_at_{{top_k}}``), ``precision_at_N``,
      ``precision_at_k`` (``precision_at_{{top_k}}``): shared share of the ranked significant genes
      (cell-eval's definitions; best 1);
    - ``de_nsig`` (``de_nsig_real``, ``de_nsig_pred``): numbers of significant genes;
    - ``energy_distance``: energy distance (V-statistic, Euclidean) between the predicted and real
      perturbed cells; at most 1,000 cells per side, drawn with a fixed seed (best 0).

    Parameters
    ----------
    pred
        Predicted cells, as :func:`~cellmint.tl.predict_perturbation` returns them:
        ``obs[perturbation_key]`` (and ``obs[context_key]``) for each cell, the control cells of each
        context included (labelled ``control``; they are recognised by that label, not by
        ``obs["is_predicted"]``).
    real
        Held-out real cells: the perturbed cells and the control cells of the same contexts. Its
        ``(context, perturbation)`` pairs must be those of ``pred``; each of its genes must be in
        ``pred``.
    perturbation_key
        ``obs`` column of the perturbation labels.
    control
        The label of control cells in ``obs[perturbation_key]``.
    context_key
        ``obs`` column of the context (cell line, patient, donor); ``None``: one context, reported
        as ``"all"``.
    train
        Training cells (controls and perturbed cells of the training contexts), which the
        ``perturbation_mean``, ``context_mean`` and ``linear`` baselines learn from. ``None``: only
        the ``control`` baseline is computed.
    baselines
        Baselines scored next to the prediction (see :func:`~cellmint.tl.perturbation_baselines`);
        their rows have ``method`` set to the baseline's name. ``()`` for none.
    metrics
        Metrics to compute (names above); ``None``: all of them.
    top_k
        Number of top DE genes of ``pearson_delta_top`` and of the ``*_at_k`` overlaps.
    normalize_to
        Baseline whose value of each metric maps to score 0 in the ``<metric>_score`` columns.
        ``None`` (or ``baselines=()``): no scores. Without ``train``, scores are relative to the
        ``control`` baseline.
    name
        ``method`` of the prediction's rows.
    {doc_layer} Read from ``pred``, ``real`` and ``train``.

    Returns
    -------
    One row per (method, context, perturbation): the prediction (``method == name``) first, then each
    baseline. Columns ``method``, ``context``, ``perturbation``, ``n_real`` and ``n_pred`` (cells),
    the metric columns above, and for each metric with a best value, ``<column>_score``: cell-eval's
    baseline-normalised score against the ``normalize_to`` baseline of the same context and
    perturbation, ``1 − value/baseline`` (best 0) or ``(value − baseline)/(1 − baseline)`` (best 1):
    1 is perfect, 0 the baseline, negative worse than it (not clipped; cell-eval clips at 0 when it
    averages). ``DataFrame.attrs`` records ``top_k``, ``normalize_to`` and the baselines.
    """
    chosen = _chosen_metrics(metrics, top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be a positive number of genes, not {top_k!r}.")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines must be among {BASELINES}, not {unknown}.")
    if not baselines:
        normalize_to = None
    if train is None:
        baselines = [b for b in baselines if b == "control"]
        if normalize_to in (*NEED_PERTURBATION, "context_mean"):
            normalize_to = "control"
    if name in BASELINES:
        raise ValueError(f"name={name!r} is the name of a baseline; choose another name for the prediction.")
    if normalize_to is not None and normalize_to not in baselines:
        raise ValueError(f"normalize_to={normalize_to!r} is not among the baselines computed {list(baselines)}.")
    control = str(control)
    genes = pd.Index(real.var_names.astype(str))
    real_side = _Side(real, genes, perturbation_key=perturbation_key, context_key=context_key, layer=layer, what="real")
    pred_side = _Side(pred, genes, perturbation_key=perturbation_key, context_key=context_key, layer=layer, what="pred")
    pairs = _check_pairs(real_side.groups, pred_side.groups, control)
    start = logg.info(f"evaluating {len(pairs)} predicted perturbations against {len(baselines)} baselines")
    methods = {name: pred_side}
    if baselines:
        is_control = real.obs[perturbation_key].astype(str).to_numpy() == control
        predicted = perturbation_baselines(train, real[is_control], pairs, perturbation_key=perturbation_key,
                                           control=control, context_key=context_key, baselines=baselines,
                                           layer=layer)  # fmt: skip
        for baseline, adata in predicted.items():
            methods[baseline] = _Side(adata, genes, perturbation_key=perturbation_key, context_key=context_key,
                                      layer=None, what=f"the {baseline} baseline", kind="lognorm")  # fmt: skip
    records = {method: [] for method in methods}
    for context in dict.fromkeys(c for c, _ in pairs):
        perturbations = [p for c, p in pairs if c == context]
        summary = _real_summary(real_side, pred_side, context, perturbations, control, chosen, top_k, genes)
        for method, side in methods.items():
            records[method] += _method_rows(method, side, summary, context, perturbations, control, chosen, top_k)
    columns = ["method", "context", "perturbation", "n_real", "n_pred"]
    columns += [column for metric in chosen for column in _columns(top_k)[metric]]
    table = pd.DataFrame([record for method in methods for record in records[method]], columns=columns)
    if normalize_to is not None:
        table = _add_scores(table, normalize_to, top_k)
    table.attrs.update({"top_k": top_k, "normalize_to": normalize_to, "baselines": list(baselines)})
    logg.info("    finished", time=start)
    return table
