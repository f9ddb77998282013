"""The query of ``cm.tl.annotate``, read as the model needs it: genes matched by name, values checked, one scale.

:class:`QueryRows` opens a query (an AnnData in memory or backed, or a path), matches its genes to
the model's panel by name, tells from its first cells what it holds (counts, a recognised log
scale, or an unrecognised one: :mod:`cellmint.models._scale`) and whether the model can use that,
and then yields, a chunk of cells at a time, the values over the model's panel on the linear scale
and each cell's library size over all of its genes, after checking every stored value (NaN,
infinity, negative values, non-integers in counts) and naming the first offending cell.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._utils._chunks import iter_row_chunks, open_root
from ..models._normalize import InputRecipe
from ..models._scale import InputScale, check_values, detect_scale
from ..store._inputs import without_ensembl_versions

#: below this share of the model's genes found in the query, annotation refuses to run
MIN_OVERLAP = 0.3
#: below this share, a warning says labels may suffer
WARN_OVERLAP = 0.8


def align_genes(query: pd.Index, model_genes: pd.Index, *, strip_versions: bool) -> tuple[np.ndarray, dict]:
    """For each model gene, its column in the query (-1: missing), and a summary of the overlap."""
    if strip_versions:
        query, model_genes = without_ensembl_versions(query), without_ensembl_versions(model_genes)
    if not query.is_unique:
        dup = query[query.duplicated()].unique()
        raise ValueError(f"The query's gene names are not unique ({len(dup)}, e.g. {list(dup[:3])}); "
                         "make them unique (adata.var_names_make_unique()) or pass gene_key=.")  # fmt: skip
    columns = query.get_indexer(model_genes).astype(np.int64)
    present = columns >= 0
    overlap = {
        "n_model_genes": len(model_genes),
        "n_found": int(present.sum()),
        "fraction": float(present.mean()) if len(present) else 0.0,
        "missing": np.asarray(model_genes[~present][:100].astype(str), dtype=object),
    }
    return columns, overlap


def usable_scale(scale: InputScale, recipe: InputRecipe, where: str) -> None:
    """Raise a ValueError when a model with ``recipe`` cannot use values of ``scale``."""
    if recipe.transform == "binary":
        return  # detected or not: any scale will do
    if recipe.kind == "counts" and not scale.recoverable:
        raise ValueError(
            f"{where} holds {scale.describe()}; the model was trained on counts and needs raw counts or log-normalised "
            "values whose scale can be undone (log1p, log2(x + 1) or log10(x + 1) of counts scaled per cell). Pass "
            "the raw counts with `layer=` (or adata.raw.to_adata())."
        )
    if recipe.kind == "lognorm" and scale.kind == "counts":
        raise ValueError(
            f"{where} holds raw counts, but the model was trained on log-normalised values of a scale it could not "
            "recognise, used as they are; pass the query normalised the same way as the reference (with `layer=`)."
        )


class QueryRows:
    """A query opened for a model: ``obs``, gene overlap, the detected scale, and its rows in chunks.

    Parameters are those of :func:`~cellmint.tl.annotate` (``adata``, ``layer``, ``gene_key``,
    ``strip_ensembl_versions``); ``target`` is the AnnData results go to (``adata`` or its copy).
    """

    def __init__(self, adata, target, genes: pd.Index, recipe: InputRecipe, *, layer: str | None,
                 gene_key: str | None, strip_versions: bool):  # fmt: skip
        self.adata, self.recipe, self.layer = adata, recipe, layer
        self.where = "X" if layer is None else f"layers[{layer!r}]"
        if isinstance(adata, str | Path):
            with open_root(adata) as root:  # obs: its names only (a file's obs columns can be large)
                index_key = root["obs"].attrs["_index"]
                names = ad.io.read_elem(root["obs"][index_key])
                self.obs = pd.DataFrame(index=pd.Index(names, name=None if index_key == "_index" else index_key))
                var = ad.io.read_elem(root["var"])
        else:
            self.obs, var = target.obs, target.var
        if gene_key is not None and gene_key not in var.columns:
            raise KeyError(f"gene_key={gene_key!r} is not a column of the query's var (columns: {list(var.columns)}); "
                           "pass the column holding the gene names the model uses, or gene_key=None for "
                           "var_names.")  # fmt: skip
        names = pd.Index(var[gene_key].astype(str)) if gene_key is not None else pd.Index(var.index.astype(str))
        self.columns, self.overlap = align_genes(names, genes, strip_versions=strip_versions)
        if self.overlap["fraction"] < MIN_OVERLAP:
            found, total, share = self.overlap["n_found"], self.overlap["n_model_genes"], self.overlap["fraction"]
            raise ValueError(f"Only {found} of the model's {total} genes ({share:.0%}) are in the query, below the "
                             f"{MIN_OVERLAP:.0%} floor: check gene identifiers (symbols or Ensembl ids; "
                             "strip_ensembl_versions=True).")  # fmt: skip
        if self.overlap["fraction"] < WARN_OVERLAP:
            warnings.warn(f"Only {self.overlap['fraction']:.0%} of the model's genes are in the query; labels may be "
                          "less accurate (missing genes are treated as not detected).", UserWarning,
                          stacklevel=3)  # fmt: skip
        self.present = np.flatnonzero(self.columns >= 0)
        self.n_genes = len(genes)
        self.scale: InputScale | None = None

    def chunks(self, chunk_size: int, *, progress: bool | None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(start, stop, values, library_size)`` per chunk.

        ``values``: dense float32 over the model's genes (zero where the query lacks a gene), on the
        linear scale for a counts model; ``library_size``: float64, over all of the query's genes.
        """
        names = self.obs.index
        for chunk in iter_row_chunks(self.adata, layer=self.layer, chunk_size=chunk_size, fmt="csr",
                                     progress=progress, desc="annotating"):  # fmt: skip
            X = chunk.X
            if self.scale is None:
                self.scale = detect_scale(X, where=f"The query's {self.where}", names=names, start=chunk.start)
                usable_scale(self.scale, self.recipe, f"The query's {self.where}")
            check_values(X, where=f"The query's {self.where}", names=names, start=chunk.start,
                         counts=self.scale.kind == "counts")  # fmt: skip
            if self.recipe.kind == "counts":  # the model's input is log1p(1e4 · x / library): linear values
                X = self.scale.to_linear(X)
            library = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
            dense = np.zeros((X.shape[0], self.n_genes), dtype=np.float32)
            dense[:, self.present] = X[:, self.columns[self.present]].toarray()
            yield chunk.start, chunk.stop, dense, library
