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
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._chunks import open_root
from .._utils._panel import InputScale, align_genes, checked_chunks, matrix_name, require_overlap
from ..models._normalize import InputRecipe

#: below this share of the model's genes found in the query, annotation refuses to run
MIN_OVERLAP = 0.3
#: below this share, a warning says labels may suffer
WARN_OVERLAP = 0.8


@numba.njit(nogil=True, cache=True)
def _panel_pass(indptr, indices, data, positions, library, dense, slot, crow, columns, values):  # pragma: no cover
    """One pass over a CSR chunk: its values over the model's panel, and each cell's total over all genes.

    A value of gene ``g`` belongs to panel column ``positions[g]`` (-1: not in the panel);
    ``library[row]`` sums every value of the row. The panel values go either into ``dense`` (zeros,
    cells × panel genes; a gene stored twice in a row adds up, as ``toarray`` does), or, when ``dense``
    has no rows, into CSR entries: ``crow`` (row starts), ``columns`` (panel positions) and ``values``
    get each row's panel entries in stored order, a gene stored twice summed into one entry (``slot``,
    one per panel gene filled with -1, is scratch). Returns the number of CSR entries.
    """
    n = 0
    for row in range(len(indptr) - 1):
        crow[row] = n
        total = 0.0
        for j in range(indptr[row], indptr[row + 1]):
            value = data[j]
            total += value
            p = positions[indices[j]]
            if p < 0:
                continue
            if dense.shape[0]:
                dense[row, p] += value
            elif slot[p] >= crow[row]:  # already in this row
                values[slot[p]] += value
            else:
                slot[p] = n
                columns[n] = p
                values[n] = value
                n += 1
        library[row] = total
    crow[len(indptr) - 1] = n
    return n


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
        self.where = matrix_name(layer)
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
        require_overlap(self.overlap, where="the query", minimum=MIN_OVERLAP,
                        why=f", below the {MIN_OVERLAP:.0%} floor: check gene identifiers (symbols or Ensembl ids; "
                            "strip_ensembl_versions=True).")  # fmt: skip
        if self.overlap["fraction"] < WARN_OVERLAP:
            warnings.warn(f"Only {self.overlap['fraction']:.0%} of the model's genes are in the query; labels may be "
                          "less accurate (missing genes are treated as not detected).", UserWarning,
                          stacklevel=3)  # fmt: skip
        self.present = np.flatnonzero(self.columns >= 0)
        self.n_genes = len(genes)
        # gene alignment, once: for each query gene, its column in the model's panel (-1: not used)
        self.positions = np.full(len(names), -1, dtype=np.int64)
        self.positions[self.columns[self.present]] = self.present
        self.scale: InputScale | None = None

    def chunks(self, chunk_size: int, *, progress: bool | None, desc: str = "annotating", dense: bool = True
               ) -> Iterator[tuple[int, int, np.ndarray | sp.csr_matrix, np.ndarray]]:  # fmt: skip
        """``(start, stop, values, library_size)`` per chunk.

        ``values``: float32 over the model's genes (zero where the query lacks a gene), on the linear
        scale for a counts model: a dense array, or with ``dense=False`` a CSR matrix (for a device that
        densifies it itself: a GPU is sent the stored values, not the zeros); ``library_size``: float64,
        over all of the query's genes.
        """
        where = f"The query's {self.where}"
        rows = checked_chunks(self.adata, layer=self.layer, where=where, names=self.obs.index,
                              accept=lambda scale: usable_scale(scale, self.recipe, where), chunk_size=chunk_size,
                              progress=progress, desc=desc)  # fmt: skip
        slot = np.full(self.n_genes, -1, dtype=np.int64)
        for chunk, scale in rows:
            self.scale = scale
            X = chunk.X
            if self.recipe.kind == "counts":  # the model's input is log1p(1e4 · x / library): linear values
                X = self.scale.to_linear(X)
            data = X.data if X.data.dtype in (np.float32, np.float64) else X.data.astype(np.float64)
            n_rows, n_entries = X.shape[0], 0 if dense else len(data)
            library, crow = np.empty(n_rows, dtype=np.float64), np.empty(n_rows + 1, dtype=np.int64)
            block = np.zeros((n_rows, self.n_genes) if dense else (0, 0), dtype=np.float32)
            columns, entries = np.empty(n_entries, dtype=np.int32), np.empty(n_entries, dtype=np.float32)
            slot[:] = -1
            n = _panel_pass(X.indptr, X.indices, data, self.positions, library, block, slot, crow, columns, entries)
            values = block if dense else sp.csr_matrix((entries[:n], columns[:n], crow), shape=(n_rows, self.n_genes))
            yield chunk.start, chunk.stop, values, library
