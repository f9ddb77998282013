"""``cm.tl.evaluate_perturbation``: score predicted perturbed cells against held-out real cells, next to baselines.

The metrics are cell-eval's (``cellmint._metrics._perturbation``, under cell-eval's names) on
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

from .._keys import Key
from .._metrics import _perturbation as pm
from .._utils import _logging as logg
from .._utils._docs import doc_params
from . import _perturbation_scores as scores
from ._perturbation_baselines import BASELINES, NEED_PERTURBATION, perturbation_baselines
from ._perturbation_data import NORMALIZATIONS, median_normalized
from ._perturbation_rows import FIXED_K, METRICS, Context, Draws, Side, ceiling_rows, check_pairs, method_rows


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
    controls: ad.AnnData | None = None,
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
      top ``top_k`` DE genes (the significant genes of largest ``|log2FC|``; fewer than ``top_k``
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
    controls
        The control cells the baselines are predicted from (and their deltas taken against), by
        default the control cells of ``real``. Give the control cells ``pred`` was made from when
        they are not ``real``'s: e.g. half of each held-out context's control cells to predict from
        and the other half in ``real`` to score against, so that no method's delta shares the
        scoring controls' sampling noise. With the same control cells on both sides, a prediction
        of the form "training perturbed pseudobulk − this context's control pseudobulk" (the
        ``linear`` baseline with few training contexts) correlates with the real delta through
        that noise alone, which inflates ``pearson_delta`` on weak perturbations (docs page
        "How to read perturbation scores").
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
    real_side = Side(real, genes, **keys, layer=real_layer, what="real")
    methods = {}
    for method, adata in predictions.items():
        what = "pred" if len(predictions) == 1 else f"pred[{method!r}]"
        adata, pred_layer = _log_values(adata, layer, normalization, what)
        methods[method] = Side(adata, genes, **keys, layer=pred_layer, what=what)
        pairs = check_pairs(real_side.groups, methods[method].groups, control)
    pred_side = next(iter(methods.values()))
    start = logg.info(f"evaluating {len(pairs)} predicted perturbations against {len(baselines)} baselines")
    if baselines:
        sources = real if controls is None else _log_values(controls, layer, normalization, "controls")[0]
        sources = sources[sources.obs[perturbation_key].astype(str).to_numpy() == control]
        predicted = perturbation_baselines(train, sources, pairs, perturbation_key=perturbation_key,
                                           control=control, context_key=context_key, baselines=baselines,
                                           layer=real_layer)  # fmt: skip
        for baseline, adata in predicted.items():
            methods[baseline] = Side(adata, genes, **keys, layer=None, what=f"the {baseline} baseline", kind="lognorm")
    rng = np.random.default_rng(random_state)
    records, replicates = {method: [] for method in [*methods, scores.CEILING]}, scores.Replicates()
    for context in dict.fromkeys(c for c, _ in pairs):
        perturbations = [p for c, p in pairs if c == context]
        draws = None
        if n_bootstrap:
            with_controls = real_side if (context, control) in real_side.groups else pred_side
            names = with_controls.names[with_controls.groups[(context, control)]]
            draws = Draws(rng, n_bootstrap, names, {p: real_side.groups[(context, p)] for p in perturbations})
        summary = Context(real_side, pred_side, context, perturbations, control, chosen, top_k, genes, draws)
        for method, side in methods.items():
            rows, boot = method_rows(method, side, summary, context, control)
            records[method] += rows
            replicates.update({(method, context, p): values for p, values in boot.items()})
        if ceiling:
            rows, boot = ceiling_rows(real_side, pred_side, summary, context, control, rng)
            records[scores.CEILING] += rows
            replicates.update({(scores.CEILING, context, p): values for p, values in boot.items()})
    columns = [Key.table.method, Key.table.context, Key.table.perturbation, "n_real", "n_pred", "n_control"]
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
    reference = table[table[Key.table.method] == normalize_to].set_index([Key.table.context, Key.table.perturbation])
    keys = pd.MultiIndex.from_frame(table[["context", "perturbation"]])
    values = {}
    for column in columns:
        baseline = reference[column].reindex(keys).to_numpy()
        values[Key.table.score(column)] = pm.normalized_score(table[column], baseline, scores.best_value(column, top_k))
    return pd.concat([table, pd.DataFrame(values, index=table.index)], axis=1)
