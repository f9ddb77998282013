"""Cells → log-normalised values for the perturbation tools: labels checked, genes aligned by name.

Training and prediction read through :func:`panel_values` (chunked, values checked), the baselines
and the evaluation through :class:`LogExpression`; both normalise counts with the one recipe of
:func:`cellmint.models._normalize.normalize`, so model, baselines and metrics see the same values
(State's known failures: genes taken by position, missing genes silently zero).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._utils._panel import checked_chunks, layer_matrix, library_size, matrix_name, unique_gene_names
from .._utils._panel import input_kind as detected_kind
from .._utils._values import checked_labels
from ..models._normalize import InputRecipe, normalize

#: the context of every cell when no context_key is given
ALL_CELLS = "all"
#: how the evaluation turns counts into log1p values: cellmint's one recipe, or cell-eval's
NORMALIZATIONS = ("cellmint", "cell-eval")


class LogExpression:
    """Rows of an AnnData's matrix as log1p-normalised values (float64) over a given list of genes.

    Raw counts are normalised with cellmint's one recipe (``log1p(10,000 · x / library size)``, the
    library size over all of the object's genes); log-normalised values are used as they are. The
    caller's AnnData is never modified.
    """

    def __init__(self, adata: ad.AnnData, genes: pd.Index, *, layer: str | None, what: str, kind: str | None = None):
        self.X = layer_matrix(adata, layer)
        where = matrix_name(layer, f"{what}.")
        names = unique_gene_names(adata.var_names, where=what)
        self.columns = names.get_indexer(genes)
        if (self.columns < 0).all():
            raise ValueError(f"{what} shares no gene (var_names) with the reference genes, e.g. {list(genes[:3])}.")
        if (self.columns < 0).any():
            missing = list(genes[self.columns < 0])
            raise ValueError(f"{len(missing)} genes are missing from {what}: {missing[:10]}"
                             f"{' …' if len(missing) > 10 else ''}.")  # fmt: skip
        if kind is None:
            kind = detected_kind(self.X, where=where)
        self.recipe = InputRecipe(kind=kind)
        if kind == "counts":
            self.library = library_size(self.X)
        #: the precision the values are held in (log values stored as float32 are float32 values, read as float64)
        stored = getattr(self.X, "dtype", np.dtype(np.float64))
        self.precision = stored if kind == "lognorm" and stored == np.float32 else np.dtype(np.float64)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        block = self.X[rows][:, self.columns]
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)
        if self.recipe.kind == "lognorm":
            return block
        return normalize(torch.from_numpy(block), torch.from_numpy(self.library[rows]), self.recipe).numpy()

    def mean(self, rows: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
        """Pseudobulk: the mean log1p value of each gene over ``rows`` (read ``chunk`` cells at a time)."""
        rows = np.asarray(rows)
        total = np.zeros(len(self.columns))
        for start in range(0, len(rows), chunk):
            total += self.rows(rows[start : start + chunk]).sum(axis=0)
        return total / len(rows)


def median_normalized(adata: ad.AnnData, *, layer: str | None, what: str) -> ad.AnnData:
    """cell-eval's normalisation of counts: ``log1p(median library size · x / library size)``, on a copy.

    Each object gets its own scale, the median library size of its cells, computed as cell-eval's
    call to scanpy's ``normalize_total`` (no ``target_sum``) does it: in the matrix's float precision
    (integers as float32), over the cells with counts for a dense matrix and over all cells for a
    sparse one. Log-normalised input comes back as it is. Returns an AnnData with the same obs and
    var and the log1p values in ``X`` (sparse stays sparse).
    """
    X = layer_matrix(adata, layer)
    if detected_kind(X, where=matrix_name(layer, f"{what}.")) != "counts":
        return adata if layer is None else ad.AnnData(X, obs=adata.obs, var=adata.var)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.dtype(np.float32)
    library = library_size(X).astype(dtype)  # cell-eval's precision: the sum rounded to the matrix's dtype
    median = np.median(library if sp.issparse(X) else library[library > 0]) if (library > 0).any() else 1
    factor = (library / dtype.type(median)).astype(dtype)
    factor[factor == 0] = 1  # cells without counts stay at 0
    if sp.issparse(X):
        values = sp.csr_matrix(X, dtype=dtype, copy=True)
        values.data = np.log1p(values.data / np.repeat(factor, np.diff(values.indptr)))
    else:
        values = np.log1p(np.asarray(X, dtype=dtype) / factor[:, None])
    return ad.AnnData(values, obs=adata.obs, var=adata.var)


def cell_groups(obs: pd.DataFrame, perturbation_key: str, context_key: str | None, *, what: str) -> dict:
    """``{(context, perturbation): row indices}``; labels as strings, context ``"all"`` without ``context_key``."""
    for key in (perturbation_key, context_key):
        if key is not None and key not in obs.columns:
            raise KeyError(f"{what}.obs has no column {key!r}.")
    perturbation = obs[perturbation_key].astype(str).to_numpy()
    context = np.full(len(obs), ALL_CELLS) if context_key is None else obs[context_key].astype(str).to_numpy()
    table = pd.DataFrame({"context": context, "perturbation": perturbation})
    return {
        key: np.asarray(rows) for key, rows in table.groupby(["context", "perturbation"], sort=True).indices.items()
    }


#: a (context, perturbation) pair needs this many cells to be trained on
MIN_CELLS = 10


def labels(adata, key: str, *, what: str) -> pd.Series:
    """An obs column as strings, with a clear error when it is missing or has empty values."""
    if key not in adata.obs:
        raise KeyError(f"{what} key {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)[:10]}).")
    return checked_labels(adata.obs[key], f"{what} {key!r}")


def contexts(adata, context_key: str | None) -> pd.Series:
    """The context of every cell (one context named ``"all"`` without ``context_key``)."""
    if context_key is None:
        return pd.Series(ALL_CELLS, index=adata.obs_names)
    return labels(adata, context_key, what="Context")


def input_kind(adata, layer: str | None, declared: str) -> str:
    """``"counts"`` or ``"lognorm"``: ``declared`` checked, or detected from the first cells' values."""
    detected = detected_kind(layer_matrix(adata, layer), where=matrix_name(layer, "adata."))
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
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), len(columns)), np.float32)
    cells = checked_chunks(adata, layer=layer, where=matrix_name(layer, "adata."), names=adata.obs_names,
                           counts=False, rows=rows, chunk_size=chunk)  # fmt: skip
    for block, _ in cells:
        panel = block.X[:, columns].toarray().astype(np.float32)
        if recipe.kind == "counts":
            panel = normalize(torch.from_numpy(panel), torch.from_numpy(library_size(block.X)), recipe)
            panel = panel.numpy()
        out[block.start : block.stop] = panel
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
