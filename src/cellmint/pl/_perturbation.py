"""``cm.pl.perturbation``: predicted against real responses, and the model against its baselines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._utils._docs import doc_params
from ..tl._perturbation_data import LogExpression
from ._figure import finish

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KINDS = ("delta", "metrics", "scaled")
#: metrics drawn by kind="metrics" unless told otherwise (each with the direction that is better)
DEFAULT_METRICS = {"pearson_delta": "higher", "pearson_delta_top100": "higher", "mse": "lower",
                   "energy_distance": "lower"}  # fmt: skip
#: drawn grey in kind="scaled"
DEFAULT_BASELINES = ("control", "perturbation_mean", "context_mean", "linear")


def _pseudobulk_delta(adata: ad.AnnData, genes: pd.Index, rows: np.ndarray, controls: np.ndarray, *,
                      what: str) -> np.ndarray:  # fmt: skip
    """Perturbed − control pseudobulk of log-normalised values over ``genes``, as the evaluation reads cells.

    Raw counts are normalised with the one recipe (:class:`~cellmint.tl._perturbation_data.LogExpression`,
    what :func:`~cellmint.tl.evaluate_perturbation` uses), log-normalised values are used as they are.
    """
    values = LogExpression(adata, genes, layer=None, what=what)
    return values.mean(rows) - values.mean(controls)


@doc_params()
def perturbation(
    data: Any,
    real: Any = None,
    *,
    kind: str = "delta",
    perturbation_key: str | None = None,
    control: str | None = None,
    context_key: str | None = None,
    perturbation: str | None = None,
    context: str | None = None,
    metrics: Sequence[str] | None = None,
    label_top: int = 8,
    key: str = Key.uns.prediction,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Plot how well perturbation responses were predicted.

    ``kind="delta"``: for one perturbation (and context), the real effect of each gene (perturbed −
    control pseudobulk of log-normalised expression) against the predicted one, with the identity
    line and the Pearson correlation; the genes with the largest real effects are named.
    ``kind="metrics"``: the model next to every baseline, one panel per metric, from the table of
    :func:`cellmint.tl.evaluate_perturbation` (each point a perturbation/context; bars the means).
    ``kind="scaled"``: each method's pooled score on the 0–1 scale (0 = the best simple baseline,
    1 = the ceiling) with its bootstrap interval, one panel per metric, from
    :func:`cellmint.tl.perturbation_summary` of the table(s).

    Parameters
    ----------
    data
        ``kind="delta"``: predicted cells from :func:`cellmint.tl.predict_perturbation` (with their
        control cells). ``kind="metrics"``: the DataFrame of :func:`cellmint.tl.evaluate_perturbation`.
        ``kind="scaled"``: such a table, a list of them, or their :func:`cellmint.tl.perturbation_summary`.
    real
        ``kind="delta"``: real cells (perturbed and control; raw counts or log-normalised values, the former
        normalised as :func:`cellmint.tl.evaluate_perturbation` does; genes matched by name).
    kind
        ``"delta"``, ``"metrics"`` or ``"scaled"``.
    perturbation_key
        ``kind="delta"``: obs column of the perturbation, in both objects.
    control
        ``kind="delta"``: the control label.
    context_key
        ``kind="delta"``: obs column of the context, in both objects.
    perturbation
        ``kind="delta"``: the perturbation to draw (default: the first predicted).
    context
        ``kind="delta"``: the context to draw (default: all cells).
    metrics
        ``kind="metrics"``/``"scaled"``: metric columns to draw (default: Pearson delta, top-100
        Pearson delta, MSE and energy distance, those present).
    label_top
        ``kind="delta"``: name this many genes with the largest absolute real effect.
    key
        ``kind="delta"``: the ``key_added`` of :func:`cellmint.tl.predict_perturbation`, whose
        ``uns[key]["perturbations"]`` gives the default ``perturbation``.
    ax
        Matplotlib axes to draw into (``kind="delta"``; a new figure otherwise).
    {doc_show}

    Returns
    -------
    {doc_plot_returns}
    """
    import matplotlib.pyplot as plt

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}.")
    if kind == "scaled":
        return _scaled(data, metrics, show=show, return_fig=return_fig)
    if kind == "metrics":
        if not isinstance(data, pd.DataFrame) or Key.table.method not in data:
            raise TypeError("kind='metrics' draws the DataFrame returned by cm.tl.evaluate_perturbation.")
        wanted = list(metrics) if metrics is not None else [m for m in DEFAULT_METRICS if m in data]
        unknown = [m for m in wanted if m not in data]
        if unknown:
            raise KeyError(f"Metric(s) {unknown} are not columns of the table.")
        import seaborn as sns

        fig, axes = plt.subplots(1, len(wanted), figsize=(3.2 * len(wanted), 3.4), squeeze=False)
        order = list(dict.fromkeys(data[Key.table.method]))
        for panel, metric in zip(axes[0], wanted, strict=True):
            sns.barplot(data=data, x=Key.table.method, y=metric, order=order, ax=panel, errorbar=None, color="0.85")
            sns.stripplot(data=data, x=Key.table.method, y=metric, order=order, ax=panel, size=3, color="C0")
            better = DEFAULT_METRICS.get(metric)
            panel.set_title(metric + (f" ({better} is better)" if better else ""), fontsize=9)
            panel.set_xlabel("")
            panel.tick_params(axis="x", rotation=60, labelsize=8)
        return finish(fig, axes[0][0], show=show, return_fig=return_fig)

    if real is None:
        raise ValueError("kind='delta' needs the real cells: perturbation(pred, real, ...).")
    if perturbation_key is None or control is None:
        raise ValueError("kind='delta' needs perturbation_key= and control=.")
    if perturbation is None:
        info = data.uns.get(key)
        predicted = list(info.get(Key.uns.perturbations, [])) if isinstance(info, Mapping) else []
        if not predicted:
            raise ValueError(f"Name the perturbation to draw: perturbation= (data.uns[{key!r}] names none).")
        perturbation = str(predicted[0])
    genes = pd.Index(data.var_names.astype(str)).intersection(pd.Index(real.var_names.astype(str)), sort=False)
    if len(genes) == 0:
        raise ValueError("The predicted and real cells share no gene names.")

    def select(adata, label):
        labels = adata.obs[perturbation_key].astype(str).to_numpy()
        mask = labels == label
        if context_key is not None and context is not None:
            mask &= adata.obs[context_key].astype(str).to_numpy() == str(context)
        return np.flatnonzero(mask)

    deltas = {}
    for name, what, adata in (("predicted", "data", data), ("real", "real", real)):
        rows, controls = select(adata, perturbation), select(adata, str(control))
        if not len(rows) or not len(controls):
            raise ValueError(f"The {name} cells have no {perturbation!r} cells or no control cells"
                             f"{f' in context {context!r}' if context is not None else ''}.")  # fmt: skip
        deltas[name] = _pseudobulk_delta(adata, genes, rows, controls, what=what)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 4.5))
    x, y = deltas["real"], deltas["predicted"]
    ax.scatter(x, y, s=8, alpha=0.6, color="C0", linewidths=0)
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([low, high], [low, high], color="0.6", lw=1, ls="--")
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    for i in np.argsort(-np.abs(x))[:label_top]:
        ax.annotate(str(genes[i]), (x[i], y[i]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
    where = f" in {context}" if context is not None else ""
    ax.set_title(f"{perturbation}{where}: Pearson r = {r:.3f}", fontsize=10)
    ax.set_xlabel("real effect (perturbed − control)")
    ax.set_ylabel("predicted effect")
    return finish(fig, ax, show=show, return_fig=return_fig)


def _scaled(data: Any, metrics: Sequence[str] | None, *, show: bool | None, return_fig: bool) -> Figure | Axes | None:
    """Pooled scaled score of each method with its interval, one panel per metric."""
    import matplotlib.pyplot as plt

    from ..tl import perturbation_summary

    tables = data if isinstance(data, list | tuple) else [data]
    if not all(isinstance(t, pd.DataFrame) and Key.table.method in t for t in tables):
        raise TypeError("kind='scaled' draws tables of cm.tl.evaluate_perturbation or their perturbation_summary.")
    is_summary = len(tables) == 1 and Key.table.perturbation not in tables[0] and Key.table.n in tables[0]
    summary = tables[0] if is_summary else perturbation_summary(tables)
    wanted = list(metrics) if metrics is not None else [m for m in DEFAULT_METRICS if Key.table.scaled(m) in summary]
    unknown = [m for m in wanted if Key.table.scaled(m) not in summary]
    if unknown:
        raise KeyError(f"Metric(s) {unknown} have no scaled scores in the summary.")
    methods = [m for m in summary[Key.table.method] if m != Key.table.replicate]
    rows = summary.set_index(Key.table.method).loc[methods]
    fig, axes = plt.subplots(1, len(wanted), figsize=(3.2 * len(wanted), 0.45 * len(methods) + 1.2), squeeze=False)
    for panel, metric in zip(axes[0], wanted, strict=True):
        value = rows[Key.table.scaled(metric)].to_numpy(dtype=float)
        low = rows[Key.table.scaled_low(metric)].to_numpy(dtype=float)
        high = rows[Key.table.scaled_high(metric)].to_numpy(dtype=float)
        y = np.arange(len(methods))[::-1]
        panel.barh(y, value, color=["C0" if m not in DEFAULT_BASELINES else "0.75" for m in methods], height=0.6)
        known = np.isfinite(low)
        panel.errorbar(value[known], y[known], xerr=[value[known] - low[known], high[known] - value[known]],
                       fmt="none", ecolor="k", elinewidth=1, capsize=2)  # fmt: skip
        for x in (0, 1):
            panel.axvline(x, color="0.5", lw=0.8, ls="--" if x else "-")
        panel.set_yticks(y, methods if panel is axes[0][0] else [""] * len(methods), fontsize=8)
        panel.set_title(f"{metric} (scaled)", fontsize=9)
        panel.set_xlabel("0 = best baseline, 1 = ceiling", fontsize=8)
    return finish(fig, axes[0][0], show=show, return_fig=return_fig)
