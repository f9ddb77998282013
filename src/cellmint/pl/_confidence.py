"""``cm.pl.confidence``: the plots to check before trusting labels from ``cm.tl.annotate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._metrics._classification import ECE_BINS, expected_calibration_error
from .._utils._docs import doc_params
from ._figure import finish

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KINDS = ("violin", "hist", "reliability", "confusion", "embedding", "unknown")
#: colours of the Unknown reasons (tl/_calls.REASONS) in the "unknown" plot
_REASON_COLORS = {"labelled": "#9e9e9e", "distance": "#d62728", "confidence": "#1f77b4", "margin": "#ff7f0e",
                  "coarse level": "#9467bd"}  # fmt: skip


def _annotation(adata: ad.AnnData, key: str) -> dict:
    """``uns[key]["annotation"]``, the record ``cm.tl.annotate`` writes (its parameters and levels)."""
    meta = adata.uns.get(key)
    annotation = meta.get(Key.uns.annotation) if isinstance(meta, Mapping) else None
    if not isinstance(annotation, Mapping):
        raise KeyError(f"adata.uns[{key!r}] holds no annotation: run cm.tl.annotate(adata, ..., key_added={key!r}) "
                       "first.")  # fmt: skip
    return annotation


def _level(annotation: Mapping, key: str, level: str | None) -> str:
    """The level to draw, among those annotate recorded (coarse to fine; default the first)."""
    recorded = annotation.get(Key.uns.levels)
    if recorded is None:  # annotated before the levels were recorded: its Unknown counts are per level, in order
        recorded = list(annotation.get("unknown", {}))
    if len(recorded) == 0:
        raise KeyError(f"adata.uns[{key!r}][{Key.uns.annotation!r}] records no levels: annotate with this version "
                       "of cellmint first.")  # fmt: skip
    levels = [str(name) for name in recorded]
    if level is None:
        return levels[0]
    if level not in levels:
        raise KeyError(f"No annotation level {level!r} under key {key!r}; levels: {levels}.")
    return level


def _palette(adata: ad.AnnData, column: str, categories: list) -> dict:
    import scanpy as sc

    colors = adata.uns.get(f"{column}_colors")
    if colors is None or len(colors) < len(categories):
        colors = sc.pl.palettes.default_20 if len(categories) <= 20 else sc.pl.palettes.default_102
    return {c: colors[i % len(colors)] for i, c in enumerate(categories)}


@doc_params()
def confidence(
    adata: ad.AnnData,
    key: str = Key.uns.annotate,
    level: str | None = None,
    *,
    kind: str = "violin",
    groupby: str | None = None,
    truth_key: str | None = None,
    basis: str = "umap",
    threshold: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Plot the confidence of labels from :func:`cellmint.tl.annotate`.

    Parameters
    ----------
    adata
        An AnnData annotated by :func:`cellmint.tl.annotate`.
    key
        The ``key_added`` of the annotation.
    level
        Label level (default: the first annotated).
    kind
        ``"violin"``: confidence per predicted label (or ``groupby``); ``"hist"``: distribution of
        confidence, split by correct/wrong when ``truth_key`` is given, else by Unknown; ``"reliability"``:
        accuracy of the model's most probable class against its calibrated probability
        (``obsm[f"{{key}}_{{level}}_proba"]``, before nearest-neighbour refinement and Unknown calls) in
        15 equal-width bins, with the ECE over the same bins (the definition of the model's metrics;
        needs ``truth_key``); ``"confusion"``: true against predicted labels, each row normalised,
        with the share and the number of cells in each box (needs ``truth_key``); ``"embedding"``: cells in
        ``obsm[f"X_{{basis}}"]`` coloured by confidence; ``"unknown"``: why cells are Unknown — each cell's
        open-set score (``obs[f"{{key}}_distance"]``, log scale) against its confidence, coloured by
        the reason of its Unknown call, with the thresholds annotate used as lines.
    groupby
        ``obs`` column to group the violins by (default: the predicted label).
    truth_key
        ``obs`` column of the true labels, for the reliability and confusion plots and a correct/wrong
        histogram.
    basis
        Embedding of the ``"embedding"`` plot.
    threshold
        Confidence threshold drawn as a line (default: the ``min_confidence`` annotate used).
    ax
        Matplotlib axes to draw into (a new figure otherwise).
    {doc_show}

    Returns
    -------
    {doc_plot_returns}
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}.")
    obs = adata.obs
    annotation = _annotation(adata, key)
    level = _level(annotation, key, level)
    column = Key.obs.label(key, level)
    conf = obs[Key.obs.confidence(key, level)].to_numpy(dtype=float)
    predicted = obs[column].astype(str).to_numpy()
    if truth_key is not None and truth_key not in obs.columns:
        raise KeyError(f"adata.obs has no truth column {truth_key!r}.")
    if kind in ("reliability", "confusion") and truth_key is None:
        raise ValueError(f"kind={kind!r} needs truth_key=, the obs column of the true labels.")
    if threshold is None:
        threshold = annotation.get("min_confidence")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    if kind == "violin":
        group = obs[groupby].astype(str) if groupby is not None else pd.Series(predicted, index=obs.index)
        order = sorted(group.unique())
        frame = pd.DataFrame({"group": group.to_numpy(), "confidence": conf})
        sns.violinplot(data=frame, x="group", y="confidence", hue="group", order=order, palette=_palette(
            adata, groupby or column, order), cut=0, inner="quartile", legend=False, ax=ax)  # fmt: skip
        ax.set_xlabel(groupby or f"predicted {level}")
        ax.tick_params(axis="x", labelrotation=90)
    elif kind == "hist":
        if truth_key is not None:
            split = np.where(predicted == obs[truth_key].astype(str).to_numpy(), "correct", "wrong")
        else:
            split = np.where(obs[Key.obs.unknown(key, level)].to_numpy(), "Unknown", "labelled")
        frame = pd.DataFrame({"confidence": conf, "cells": split})
        sns.histplot(data=frame, x="confidence", hue="cells", bins=20, binrange=(0, 1), multiple="stack", ax=ax)
    elif kind == "reliability":
        proba = adata.obsm[Key.obsm.proba(key, level)]
        truth = obs[truth_key].astype(str).to_numpy()
        top = np.asarray(proba.columns.astype(str))[proba.to_numpy().argmax(axis=1)]
        top_conf = proba.to_numpy().max(axis=1)
        correct = top == truth
        bins = np.minimum((top_conf * ECE_BINS).astype(int), ECE_BINS - 1)
        table = pd.DataFrame({"bin": bins, "confidence": top_conf, "correct": correct}).groupby("bin").mean()
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.bar((table.index + 0.5) / ECE_BINS, table["correct"], width=1 / ECE_BINS, edgecolor="black", alpha=0.7,
               label="accuracy")  # fmt: skip
        ax.plot(table["confidence"], table["correct"], "o", color="black", label="mean confidence")
        ece = expected_calibration_error(top_conf, correct)  # the definition of the model's metrics
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{level}: ECE {ece:.3f} ({ECE_BINS} bins, {len(correct):,} cells)")  # fmt: skip
        ax.legend(loc="upper left", frameon=False)
    elif kind == "confusion":
        truth = obs[truth_key].astype(str)
        counts = pd.crosstab(truth, pd.Series(predicted, index=obs.index, name="predicted"))
        table = counts.div(counts.sum(axis=1), axis=0)
        # each cell: the share of its row (colour) and the number of cells behind it
        annot = table.map(lambda v: f"{v:.2f}") + "\n" + counts.map(lambda n: f"{n:,}") if len(table) <= 15 else False
        sns.heatmap(table, vmin=0, vmax=1, cmap="Blues", annot=annot, fmt="", ax=ax, annot_kws={"fontsize": "small"},
                    cbar_kws={"label": "share of true cells"})  # fmt: skip
        ax.set(xlabel=f"predicted {level}", ylabel=truth_key)
    elif kind == "unknown":
        _why_unknown(obs, key, level, conf, annotation, ax)
    else:
        name = Key.obsm.basis(basis)
        if name not in adata.obsm:
            raise KeyError(f"adata.obsm has no {name!r}; compute it (e.g. sc.tl.umap) or pick another basis.")
        xy = np.asarray(adata.obsm[name])[:, :2]
        order = np.argsort(conf)[::-1]  # least confident on top
        points = ax.scatter(xy[order, 0], xy[order, 1], c=conf[order], s=8, cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(points, ax=ax, label=f"{level} confidence")
        ax.set(xlabel=f"{basis}1", ylabel=f"{basis}2", xticks=[], yticks=[])
    if threshold is not None and kind in ("violin", "hist", "unknown"):
        (ax.axvline if kind == "hist" else ax.axhline)(threshold, ls="--", color="red", lw=1)
    if kind not in ("reliability", "unknown"):
        ax.set_title(f"{level}: {kind}" if kind != "violin" else f"{level}: confidence")
    return finish(fig, ax, show=show, return_fig=return_fig)


def _why_unknown(obs: pd.DataFrame, key: str, level: str, conf: np.ndarray, annotation: Mapping, ax: Axes) -> None:
    """Open-set score against confidence, coloured by the reason of each cell's Unknown call."""
    for needed in (Key.obs.distance(key), Key.obs.unknown_reason(key, level)):
        if needed not in obs.columns:
            raise KeyError(f"adata.obs has no {needed!r}: annotate with this version of cellmint first.")
    score = obs[Key.obs.distance(key)].to_numpy(dtype=float)
    reason = obs[Key.obs.unknown_reason(key, level)].astype(str).replace("", "labelled").to_numpy()
    for name, color in _REASON_COLORS.items():
        cells = reason == name
        if cells.any():
            label = f"{name} ({cells.sum():,})" if name == "labelled" else f"Unknown: {name} ({cells.sum():,})"
            ax.scatter(np.maximum(score[cells], 1e-3), conf[cells], s=6, color=color, alpha=0.7, linewidths=0,
                       label=label)  # fmt: skip
    limit = annotation.get("max_distance")
    if limit is not None and np.isfinite(limit):
        ax.axvline(limit, ls="--", color=_REASON_COLORS["distance"], lw=1)
    ax.set_xscale("log")
    ax.set(ylim=(0, 1.02), xlabel="open-set score (distance to the reference, relative)", ylabel="confidence",
           title=f"{level}: why cells are Unknown ({(reason != 'labelled').sum():,} of "
           f"{len(reason):,})")  # fmt: skip
    ax.legend(loc="lower left", frameon=False, fontsize="small", markerscale=2)
