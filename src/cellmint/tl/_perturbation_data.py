"""Cells → the perturbation model's values: labels checked, genes aligned by name, one normalisation.

Training and prediction both go through :func:`panel_values` with the model's gene panel and input
recipe, so they cannot disagree on gene order or normalisation (State's known failure: genes taken
by position, missing genes silently zero).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..models._normalize import InputRecipe, detect_kind

#: a (context, perturbation) pair needs this many cells to be trained on
MIN_CELLS = 10
#: the single context of data without ``context_key``
ONE_CONTEXT = "all"


def labels(adata, key: str, *, what: str) -> pd.Series:
    """An obs column as strings, with a clear error when it is missing or has empty values."""
    if key not in adata.obs:
        raise KeyError(f"{what} key {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)[:10]}).")
    values = adata.obs[key]
    missing = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        examples = list(adata.obs_names[missing][:3])
        raise ValueError(f"adata.obs[{key!r}] is empty or NaN in {int(missing.sum())} cells (e.g. {examples}): "
                         "label every cell or drop those cells.")  # fmt: skip
    return values.astype(str)


def contexts(adata, context_key: str | None) -> pd.Series:
    """The context of every cell (one context named ``"all"`` without ``context_key``)."""
    if context_key is None:
        return pd.Series(ONE_CONTEXT, index=adata.obs_names)
    return labels(adata, context_key, what="Context")


def _matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found (layers: {list(adata.layers)}).")
    return adata.layers[layer]


def input_kind(adata, layer: str | None, declared: str) -> str:
    """``"counts"`` or ``"lognorm"``: ``declared`` checked, or detected from the first cells' values."""
    X = _matrix(adata, layer)
    head = X[: min(500, adata.n_obs)]
    sample = head.data if sp.issparse(head) else np.asarray(head)[np.asarray(head) != 0]
    detected = detect_kind(sample, where="layer " + repr(layer) if layer else "adata.X")
    if declared == "auto":
        return detected
    if declared == "counts" and detected != "counts":
        raise ValueError("input='counts' was declared, but the values are not integers: pass raw counts "
                         "with layer=, or input='lognorm'.")  # fmt: skip
    if declared not in ("counts", "lognorm"):
        raise ValueError(f"input must be 'auto', 'counts' or 'lognorm', not {declared!r}.")
    return declared


def panel_values(adata, columns: np.ndarray, recipe: InputRecipe, layer: str | None, rows: np.ndarray | None = None,
                 *, chunk: int = 20_000) -> np.ndarray:  # fmt: skip
    """Dense float32 log-normalised values (cells × panel) of ``rows``; ``columns``: each panel gene's column.

    Counts become ``log1p(target_sum · x / library size)`` with the library size over all of the
    cell's genes. NaN, infinite or negative values are an error naming the problem.
    """
    X = _matrix(adata, layer)
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), len(columns)), np.float32)
    for start in range(0, len(rows), chunk):
        block = X[rows[start : start + chunk]]
        block = block.tocsr() if sp.issparse(block) else np.asarray(block)
        values = block.data if sp.issparse(block) else block
        if not np.isfinite(values).all():
            raise ValueError("The expression values contain NaN or infinite values.")
        if values.size and values.min() < 0:
            raise ValueError("The expression values are negative in places: pass raw counts or log-normalised values.")
        panel = block[:, columns]
        panel = np.asarray(panel.toarray() if sp.issparse(panel) else panel, dtype=np.float32)
        if recipe.kind == "counts":
            library = np.asarray(block.sum(axis=1), dtype=np.float32).ravel()
            panel = np.log1p(panel * (recipe.target_sum / np.maximum(library, 1.0))[:, None])
        out[start : start + len(panel)] = panel
    return out


def rep_values(adata, use_rep: str, rows: np.ndarray, n_features: int | None = None) -> np.ndarray:
    """``adata.obsm[use_rep]`` of ``rows`` as float32, checked for presence, width and finiteness."""
    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep={use_rep!r} is not in adata.obsm (keys: {list(adata.obsm)}).")
    values = np.asarray(adata.obsm[use_rep][rows], dtype=np.float32)
    if n_features is not None and values.shape[1] != n_features:
        raise ValueError(f"adata.obsm[{use_rep!r}] has {values.shape[1]} columns; the model was trained on "
                         f"{n_features}. Compute the representation the same way as for training.")  # fmt: skip
    if not np.isfinite(values).all():
        raise ValueError(f"adata.obsm[{use_rep!r}] contains NaN or infinite values.")
    return values
