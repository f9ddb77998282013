"""The 0–1 scale of perturbation scores: a replicate ceiling, bootstrap intervals over cells, pooled summaries.

A raw metric (a Pearson correlation of 0.6, an energy distance of 2.1) says little until it is placed
between two references measured on the same cells:

- **0 is the best simple baseline** (control, perturbation mean, context mean, linear ridge;
  :func:`~cellmint.tl.perturbation_baselines`): what a prediction without a model reaches;
- **1 is the replicate ceiling**: the real perturbed cells of each context and perturbation are
  split at random into two disjoint halves, and one half, taken as a prediction, is scored against
  the other (method ``"replicate"``, with the context's control cells shared, as every method
  shares them). Two halves disagree by the sampling noise of both; the true response would differ
  from the real cells by their noise alone, so the ceiling is the split-half score turned into the
  score of the true response (:func:`noise_ceiling`): the best any prediction can expect on these
  cells. The raw split-half score itself is no ceiling: with tens of cells per perturbation, a
  half is noisier than a baseline averaged over many cells, and scores below it.

``scaled = (value − best baseline) / (ceiling − best baseline)``, for metrics where higher or lower
is better alike; NaN where the ceiling is not better than the best baseline (no room to measure).

Intervals come from a bootstrap over cells: in each replicate the real control cells of a context
and the real perturbed cells of each pair are drawn again with replacement, and every prediction
made from a control cell (``obs["source_cell"]``) follows its cell; predictions that name no source
are drawn on their own. The intervals are the spread (2.5th to 97.5th percentile at 95%) of the
recomputed metric (and of the recomputed scaled score: the difference to the baseline chosen on the
data, over the data's distance from that baseline to the ceiling, :func:`resampled_scaled`),
centred on the value: drawing cells with replacement adds their sampling noise once more, which
shifts every replicate the same way, so the percentiles are moved by ``value − median`` (see
:func:`interval`). Metrics of pseudobulks and
cells are resampled (:data:`BOOTSTRAP_METRICS`); DE-based metrics are not (their tests would have to
be rerun in every replicate); the top-k DE genes of ``pearson_delta_top`` stay those of the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._keys import Key
from .._metrics import _perturbation as pm

#: the method name of the split-half replicate rows
CEILING = Key.table.replicate
#: metrics with bootstrap intervals (computed from pseudobulks and cells)
BOOTSTRAP_METRICS = ("pearson_delta", "pearson_delta_top", "mse", "mae", "mse_delta", "mae_delta", "energy_distance")


# -- resampling ------------------------------------------------------------------------------------------------


class Replicates(dict):
    """``{(method, context, perturbation): {column: bootstrap values}}``, kept in ``DataFrame.attrs``.

    pandas compares and deep-copies ``attrs`` in many operations; arrays would make those fail or
    copy megabytes each time, so this mapping compares by identity and is shared, not copied.
    """

    __hash__ = object.__hash__

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    def __deepcopy__(self, memo) -> Replicates:
        return self


def draw_weights(rng: np.random.Generator, n: int, n_bootstrap: int) -> np.ndarray:
    """How often each of ``n`` cells is drawn in each bootstrap replicate (n_bootstrap × n, float64)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)


def weighted_means(weights: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Pseudobulk of each replicate (replicates × genes); NaN for a replicate that drew none of the cells."""
    totals = weights.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ cells) / totals


def split_halves(rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Two disjoint random halves of ``rows`` (``n // 2`` each; an odd cell out), or None under 4 cells."""
    if len(rows) < 4:
        return None
    order = rng.permutation(np.asarray(rows))
    half = len(order) // 2
    return np.sort(order[:half]), np.sort(order[half : 2 * half])


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, np.clip((a * b).sum(1) / norm, -1.0, 1.0), np.nan)


def bulk_replicates(pred_bulk, pred_control, real_bulk, real_control, top: np.ndarray | None, columns: dict) -> dict:
    """Per bootstrap replicate (rows of the replicates × genes arrays), the pseudobulk metrics named in ``columns``.

    ``columns`` maps metric (``pearson_delta``, ``pearson_delta_top``, ``mse``, …) to its column name;
    the formulas are those of :mod:`cellmint._metrics._perturbation`.
    """
    pred_delta, real_delta = pred_bulk - pred_control, real_bulk - real_control
    out = {}
    for metric, column in columns.items():
        if metric == "pearson_delta":
            out[column] = _row_pearson(pred_delta, real_delta)
        elif metric == "pearson_delta_top":
            out[column] = _row_pearson(pred_delta[:, top], real_delta[:, top])
        elif metric in ("mse", "mae", "mse_delta", "mae_delta"):
            pred, real = (pred_delta, real_delta) if metric.endswith("_delta") else (pred_bulk, real_bulk)
            error = pred - real
            out[column] = (error**2).mean(1) if metric.startswith("mse") else np.abs(error).mean(1)
    return out


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(squared, 0.0))


def self_term(cells: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``E‖Y−Y'‖`` of each replicate's multiset of cells, on the scale of the data's V-statistic (replicates,).

    Two draws of the same cell are not a pair at distance 0 (which would shrink the term, and
    inflate the energy distance, by the share of repeated draws): the mean is over pairs of draws
    of different cells, times ``1 − 1/n`` as in the V-statistic of the ``n`` cells themselves.
    """
    distances = _distances(cells, cells)
    np.fill_diagonal(distances, 0.0)
    pairs = weights.sum(1) ** 2 - (weights**2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((weights @ distances) * weights).sum(1) / pairs * (1 - 1 / len(cells))


def energy_replicates(x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Energy distance (V-statistic, Euclidean) between the weighted multisets of each replicate.

    ``yy`` is :func:`self_term` of ``y`` with ``wy`` (shared by every method scored against ``y``).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        cross = ((wx @ _distances(x, y)) * wy).sum(1) / (wx.sum(1) * wy.sum(1))
    return 2.0 * cross - self_term(x, wx) - yy


# -- the ceiling: what the true response would score, estimated from the split halves ----------------------------

#: correlations: the true response correlates with a measurement as the square root of its reliability, which
#: Spearman–Brown ``2r / (1 + r)`` brings from the split-half r to the full number of cells
CORRELATIONS = ("pearson_delta", "pearson_delta_top", "de_spearman_lfc_sig", "de_spearman_sig")
#: other agreement metrics: Spearman–Brown alone (cell-eval 0.8.2's ``compute_ceiling`` list)
AGREEMENTS = ("discrimination_score", "overlap_at_", "precision_at_", "de_direction_match", "de_sig_genes_recall",
              "pr_auc", "roc_auc")  # fmt: skip
#: errors driven by sampling noise (variance ∝ 1/cells): squared, and absolute (∝ 1/√cells)
SQUARED, ABSOLUTE = ("mse", "mse_delta", "energy_distance"), ("mae", "mae_delta")


def noise_ceiling(column: str, replicate, n_real, n_control):
    """What the true response would score against the real cells, from the split-half replicate's score.

    Each half is the truth plus its own sampling noise (variance ∝ 1/cells), the control cells
    shared; ``n_real`` perturbed cells were split, ``n_control`` control cells. Then:

    - correlations (:data:`CORRELATIONS`): ``√(2r / (1 + r))``, the correlation of the truth with a
      full measurement (Spearman–Brown, then the attenuation's square root); NaN for ``r ≤ 0``;
    - other agreement metrics (:data:`AGREEMENTS`): ``2r / (1 + r)`` (cell-eval 0.8.2's ceiling);
    - squared errors and the energy distance: ``× (1 + n_real / n_control) / 4`` — the halves differ by
      the noise of two half-sized sets (``4σ²/n``), the truth from the real cells by that of the
      perturbed and the control cells (``σ²/n + σ²/n_control``); absolute errors: the square root of
      that factor;
    - anything else (counts, ``pearson_edistance``, ``clustering_agreement``): as measured.
    """
    values = np.asarray(replicate, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if column.startswith(CORRELATIONS):
            return np.where(values > 0, np.sqrt(2 * values / (1 + values)), np.nan)
        if column.startswith(AGREEMENTS):
            return np.where(values > 0, 2 * values / (1 + values), np.nan)
        factor = (1 + np.asarray(n_real, dtype=np.float64) / np.asarray(n_control, dtype=np.float64)) / 4
    if column in SQUARED:
        return values * factor
    if column in ABSOLUTE:
        return values * np.sqrt(factor)
    return values


# -- scaled scores ---------------------------------------------------------------------------------------------


def best_value(column: str, top_k: int) -> float | None:
    """The best value (0 or 1) of a metric column, or None for counts."""
    if column == f"pearson_delta_top{top_k}":
        return pm.BEST_VALUE["pearson_delta_top"]
    if column == f"overlap_at_{top_k}" or column == f"precision_at_{top_k}":
        return 1.0
    return pm.BEST_VALUE.get(column)


def _better(a: np.ndarray, b: np.ndarray, best: float) -> np.ndarray:
    """Where ``a`` is strictly better than ``b``."""
    with np.errstate(invalid="ignore"):
        return a > b if best == 1.0 else a < b


def scaled(value, baseline, ceiling, best: float) -> np.ndarray:
    """``(value − baseline) / (ceiling − baseline)``; NaN where the ceiling is not better than the baseline."""
    value, baseline, ceiling = (np.asarray(v, dtype=np.float64) for v in (value, baseline, ceiling))
    room = _better(ceiling, baseline, best)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(room, (value - baseline) / (ceiling - baseline), np.nan)


def resampled_scaled(own, base, baseline: float, ceiling: float, best: float) -> np.ndarray:
    """Bootstrap replicates of a scaled score: the difference to the baseline resampled, the scale held fixed.

    ``(own − base) / (ceiling − baseline)`` with the replicates of the value and of the baseline
    (paired: the same real cells) over the data's distance from the baseline to the ceiling. The
    ceiling, estimated from two halves of few cells, is noisier than the comparison; it sets the
    unit of the scale, as the baseline sets its 0, and is not resampled. NaN without room.
    """
    own, base = np.asarray(own, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if not np.isfinite(ceiling) or not _better(np.asarray(ceiling), np.asarray(baseline), best):
        return np.full(own.shape, np.nan)
    return (own - base) / (ceiling - baseline)


def interval(replicates: np.ndarray, level: float = 0.95, value: float | None = None,
             best: float | None = None) -> tuple[float, float]:  # fmt: skip
    """The bootstrap interval: the spread of the replicates' central ``level`` share, placed around ``value``.

    Drawing cells with replacement adds their sampling noise once more, which moves every replicate
    the same way (lower correlations, larger errors); the percentiles are therefore shifted by
    ``value − median`` so the interval is centred as the value is (``value=None``: plain
    percentiles). ``best`` (0 or 1) bounds a raw metric's interval at its best value. NaN when more
    than half of the replicates are undefined.
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0 or len(finite) < 0.5 * len(replicates):
        return float("nan"), float("nan")
    tail = 50 * (1 - level)
    low, middle, high = np.percentile(finite, [tail, 50, 100 - tail])
    if value is not None:
        if not np.isfinite(value):
            return float("nan"), float("nan")
        low, high = low + value - middle, high + value - middle
    if best == 1.0:
        low, high = min(low, 1.0), min(high, 1.0)
    elif best == 0.0:
        low, high = max(low, 0.0), max(high, 0.0)
    return float(low), float(high)


def _ceilings(by_method: dict, column: str, index) -> np.ndarray:
    rows = by_method[CEILING].reindex(index)
    return noise_ceiling(column, rows[column].to_numpy(dtype=np.float64), rows["n_real"], rows["n_control"])


def add_scaled(table: pd.DataFrame, columns: Sequence[str], baselines: Sequence[str], replicates: dict,
               top_k: int, level: float) -> pd.DataFrame:  # fmt: skip
    """``<column>_scaled`` for each metric column (per row: its best baseline and its ceiling), and intervals.

    ``replicates``: ``{(method, context, perturbation): {column: bootstrap values}}``; columns with
    replicates also get ``<column>_low``/``_high`` and, with a ceiling and baselines,
    ``<column>_scaled_low``/``_scaled_high``. Without a ceiling or baselines there is no scaled score.
    """
    keys = list(zip(table["context"], table["perturbation"], strict=True))
    index = pd.MultiIndex.from_tuples(keys)
    by_method = {m: part.set_index([Key.table.context, Key.table.perturbation])
                 for m, part in table.groupby(Key.table.method, sort=False)}  # fmt: skip
    candidates = [b for b in baselines if b in by_method]
    can_scale = CEILING in by_method and bool(candidates)
    new = {}
    for column in columns:
        best = best_value(column, top_k)
        resampled = any(column in r for r in replicates.values())
        if best is None or not (can_scale or resampled):
            continue
        if can_scale:
            values = np.stack([by_method[b][column].reindex(index).to_numpy(dtype=np.float64) for b in candidates])
            finite = np.where(np.isfinite(values), values, -np.inf if best == 1.0 else np.inf)
            choice = finite.argmax(0) if best == 1.0 else finite.argmin(0)
            reference = values[choice, np.arange(len(keys))]
            ceiling = _ceilings(by_method, column, index)
            new[Key.table.scaled(column)] = scaled(table[column].to_numpy(dtype=np.float64), reference, ceiling, best)
        if not resampled:
            continue
        names = [f"{column}_low", f"{column}_high"]
        names += [Key.table.scaled_low(column), Key.table.scaled_high(column)] if can_scale else []
        bounds = {name: [] for name in names}
        for i, (method, key) in enumerate(zip(table[Key.table.method], keys, strict=True)):
            own = replicates.get((method, *key), {}).get(column)
            found = [*interval(own, level, table[column].iloc[i], best)] if own is not None else [np.nan, np.nan]
            if can_scale:
                base = replicates.get((candidates[choice[i]], *key), {}).get(column)
                if own is not None and base is not None:
                    rel = resampled_scaled(own, base, reference[i], ceiling[i], best)
                    found += interval(rel, level, new[Key.table.scaled(column)][i])
                else:
                    found += [np.nan, np.nan]
            for name, value in zip(names, found, strict=True):
                bounds[name].append(value)
        new |= bounds
    return pd.concat([table, pd.DataFrame(new, index=table.index)], axis=1)


# -- pooled summaries ------------------------------------------------------------------------------------------


def perturbation_summary(
    tables: pd.DataFrame | Sequence[pd.DataFrame],
    *,
    by: str | Sequence[str] = Key.table.method,
    metrics: Sequence[str] | None = None,
    level: float | None = None,
) -> pd.DataFrame:
    """Pool the tables of :func:`~cellmint.tl.evaluate_perturbation`: mean raw and 0–1 scaled scores, with intervals.

    Rows of one or more tables (several held-out units, seeds, folds) are grouped by ``by``; each
    group's score is the mean of its rows, and its scaled score places that mean between the mean of
    the best baseline and the mean of the replicate ceiling over the *same* (table, context,
    perturbation) rows (the ceiling of each row: :func:`noise_ceiling` of its split-half replicate)::

        scaled = (mean − mean of the best baseline) / (mean of the ceiling − mean of the best baseline)

    where the best baseline is the one whose mean over those rows is best (one baseline for the
    group, not the best of each row, which no predictor could match in expectation). Rows where the
    metric, that baseline or the replicate is undefined are left out of that metric. Intervals come
    from the tables' bootstrap replicates: replicate ``b`` of the mean is the mean of every row's
    replicate ``b`` (rows are resampled independently of each other), and the scaled score's
    difference to the baseline is recomputed in each replicate over the fixed distance from that
    baseline to the ceiling (:func:`resampled_scaled`).

    Parameters
    ----------
    tables
        One table or several (they may repeat contexts and perturbations, e.g. one per seed).
    by
        Columns to group by: ``"method"`` (pooled over every unit), or e.g. ``["method", "context"]``
        (per held-out unit). Extra columns the caller added to the tables (``"seed"``) may be used.
    metrics
        Metric columns to summarise; default: every metric column with a best value.
    level
        Coverage of the intervals; default: the tables' ``attrs["level"]``.

    Returns
    -------
    One row per group, sorted as first seen: the ``by`` columns, ``n`` (rows), and per metric
    ``<metric>``, ``<metric>_ceiling`` (the mean ceiling over the group's rows), ``<metric>_low``,
    ``<metric>_high``, ``<metric>_scaled``, ``<metric>_scaled_low``, ``<metric>_scaled_high`` and
    ``<metric>_baseline`` (the best baseline's name); intervals are NaN for metrics without
    bootstrap replicates. Groups of baseline and replicate rows are summarised too (the best
    baseline scores 0; the raw split-half replicate usually below 1).
    """
    tables = [tables] if isinstance(tables, pd.DataFrame) else list(tables)
    if not tables:
        raise ValueError("No tables to summarise.")
    by = [by] if isinstance(by, str) else list(by)
    top_k = tables[0].attrs.get("top_k", 100)
    level = level if level is not None else tables[0].attrs.get("level", 0.95)
    frames, replicates = [], {}
    for i, table in enumerate(tables):
        missing = [c for c in (Key.table.method, Key.table.context, Key.table.perturbation, *by) if c not in table]
        if missing:
            raise KeyError(f"Table {i} has no column(s) {missing}: pass tables from cm.tl.evaluate_perturbation.")
        frames.append(table.assign(_table=i))
        replicates |= {(i, *key): values for key, values in table.attrs.get("bootstrap", {}).items()}
    frame = pd.concat(frames, ignore_index=True)
    baselines = list(dict.fromkeys(b for t in tables for b in t.attrs.get("baselines", [])))
    if metrics is None:
        metrics = [c for c in frame.columns if best_value(c, top_k) is not None and not c.endswith(
            ("_score", "_scaled", "_low", "_high"))]  # fmt: skip
    keyed = frame.set_index(["_table", Key.table.method, Key.table.context, Key.table.perturbation])
    rows = []
    for group, members in frame.groupby(by, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        record = dict(zip(by, group, strict=True)) | {"n": len(members)}
        keys = list(zip(members["_table"], members["context"], members["perturbation"], strict=True))
        for metric in metrics:
            record |= _pooled(metric, members, keys, keyed, baselines, replicates, best_value(metric, top_k), level)
        rows.append(record)
    return pd.DataFrame(rows)


def _values(keyed: pd.DataFrame, method: str, keys: list, metric: str) -> np.ndarray:
    index = pd.MultiIndex.from_tuples([(t, method, c, p) for t, c, p in keys])
    return keyed[metric].reindex(index).to_numpy(dtype=np.float64)


def _boot(replicates: dict, method: str, keys: list, metric: str) -> np.ndarray | None:
    """Replicates × rows, or None when a row has none."""
    found = [replicates.get((t, method, c, p), {}).get(metric) for t, c, p in keys]
    if not found or any(f is None for f in found):
        return None
    return np.stack(found, axis=1)


def _pooled(metric, members, keys, keyed, baselines, replicates, best, level) -> dict:
    own = members[metric].to_numpy(dtype=np.float64)
    sizes = np.stack([_values(keyed, CEILING, keys, n) for n in ("n_real", "n_control")], axis=1)
    ceiling = noise_ceiling(metric, _values(keyed, CEILING, keys, metric), sizes[:, 0], sizes[:, 1])
    by_baseline = {b: _values(keyed, b, keys, metric) for b in baselines}
    valid = np.isfinite(own) & np.isfinite(ceiling)
    out = {metric: float(np.nanmean(own)) if np.isfinite(own).any() else np.nan}
    means = {b: v[valid].mean() for b, v in by_baseline.items() if valid.any() and np.isfinite(v[valid]).all()}
    choice = None
    if means:
        choice = (max if best == 1.0 else min)(means, key=means.get)
    method = members[Key.table.method]
    boot_own = _boot(replicates, method.iloc[0], keys, metric) if method.nunique() == 1 else None
    low = high = scaled_low = scaled_high = np.nan
    if boot_own is not None:
        with warnings.catch_warnings():  # replicates where every row is undefined are NaN, and left out
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = interval(np.nanmean(boot_own, axis=1), level, out[metric], best)
    value = np.nan
    if choice is not None:
        value = float(scaled(own[valid].mean(), means[choice], ceiling[valid].mean(), best))
        boot_base = _boot(replicates, choice, keys, metric)
        if boot_own is not None and boot_base is not None:
            pooled = [b[:, valid].mean(axis=1) for b in (boot_own, boot_base)]
            rel = resampled_scaled(*pooled, means[choice], ceiling[valid].mean(), best)
            scaled_low, scaled_high = interval(rel, level, value)
    out[f"{metric}_ceiling"] = float(ceiling[valid].mean()) if valid.any() else np.nan
    return out | {f"{metric}_low": low, f"{metric}_high": high, Key.table.scaled(metric): value,
            Key.table.scaled_low(metric): scaled_low, Key.table.scaled_high(metric): scaled_high,
            f"{metric}_baseline": choice}  # fmt: skip
