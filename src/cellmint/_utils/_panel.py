"""Checked rows over a gene panel: the one doorway from a tool's input to the values it reads.

Every public function that takes data decides here, and only here:

- which matrix: ``X`` or ``layers[layer]`` (:func:`layer_matrix`; files and backed data through the
  chunk reader, which raises the same :func:`~cellmint._utils._chunks.layer_error`);
- which genes: names checked for duplicates (:func:`unique_gene_names`), Ensembl version suffixes
  stripped on request (:func:`without_ensembl_versions`), the ``genes=`` rules — ``None``, a list, or a
  boolean ``var`` column (:func:`gene_panel`) — and alignment by name with its overlap report
  (:func:`align_genes`, :func:`require_overlap`);
- what the matrix holds: counts or a log scale, told from its first cells (:func:`detect_scale` for the
  annotator, :func:`input_kind` for the perturbation tools), and every value checked — NaN/infinity,
  negative (z-scored) values, non-integers in counts (:func:`checked_chunks`, :func:`check_values`);
- each cell's library size, over all of its genes, in float64 (:func:`library_size`);
- and reading rows a chunk at a time, through the one chunk reader (:func:`checked_chunks`).

So the same bad input gives the same error type and message from every tool.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..models._scale import InputScale, check_values, detect_kind, detect_scale
from ._chunks import RowChunk, iter_row_chunks, layer_error

__all__ = [
    "InputScale",
    "adata_gene_panel",
    "align_genes",
    "check_values",
    "checked_chunks",
    "detect_scale",
    "gene_panel",
    "input_kind",
    "layer_matrix",
    "library_size",
    "matrix_name",
    "panel_mask",
    "require_overlap",
    "unique_gene_names",
    "without_ensembl_versions",
]

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")
#: cells whose stored values tell counts from log-values (:func:`input_kind`)
KIND_SAMPLE_CELLS = 2000
#: at most this many non-zero values are looked at by :func:`input_kind`
KIND_SAMPLE_VALUES = 1_000_000


# -- which matrix -------------------------------------------------------------------------------


def matrix_name(layer: str | None, owner: str = "") -> str:
    """How messages name the matrix read: ``"X"`` or ``"layers['counts']"``, after ``owner`` (``"adata."``)."""
    return f"{owner}X" if layer is None else f"{owner}layers[{layer!r}]"


def layer_matrix(adata: Any, layer: str | None) -> Any:
    """``adata.X`` or ``adata.layers[layer]``; a missing layer is the chunk reader's KeyError ("Layer … not found")."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise layer_error(layer, adata.layers.keys())
    return adata.layers[layer]


# -- which genes --------------------------------------------------------------------------------


def without_ensembl_versions(names: pd.Index) -> pd.Index:
    """Gene names without Ensembl version suffixes (ENSG….12 → ENSG…); other names unchanged."""
    return pd.Index([_ENSEMBL_VERSION.sub(r"\1", str(n)) for n in names])


def unique_gene_names(names: Any, *, where: str, strip_versions: bool = False,
                      consequence: str = "genes are matched by name",
                      fix: str = "Call adata.var_names_make_unique() first.") -> pd.Index:  # fmt: skip
    """Gene names as strings (versions stripped on request); a ValueError when one occurs twice.

    The message reads ``"{where} holds N duplicated gene names (e.g. [...]): {consequence}. {fix}"``.
    """
    names = pd.Index(pd.Index(names).astype(str))
    if strip_versions:
        names = without_ensembl_versions(names)
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        raise ValueError(f"{where} holds {len(dup)} duplicated gene names (e.g. {list(dup[:3])}): {consequence}. {fix}")
    return names


def panel_mask(var: pd.DataFrame, column: str, *, where: str, alternatives: str) -> np.ndarray:
    """The genes of a boolean ``var`` column; any other column (or none) is a ValueError.

    ``alternatives`` names what else ``genes=`` may be (``"'intersection', 'union'"``).
    """
    if column not in var.columns or var[column].dtype != bool:
        raise ValueError(f"genes={column!r} is neither {alternatives} nor a boolean var column of {where}.")
    return var[column].to_numpy()


def gene_panel(names: pd.Index, var: pd.DataFrame, genes: Any, *, where: str = "adata",
               alternatives: str = "None, a list of gene names", require_present: bool = True) -> pd.Index:  # fmt: skip
    """The ordered gene panel of ``genes``: ``None`` (all ``names``), a boolean ``var`` column, or a list.

    A list names each gene once; with ``require_present`` every listed gene must be in ``names``
    (a KeyError otherwise; ``build_store`` decides about missing genes itself).
    """
    if genes is None:
        return names
    if isinstance(genes, str):
        return names[panel_mask(var, genes, where=where, alternatives=alternatives)]
    panel = pd.Index([str(g) for g in genes])
    if not panel.is_unique:
        raise ValueError(f"The `genes` list has duplicates, e.g. {list(panel[panel.duplicated()].unique()[:3])}.")
    if require_present and (absent := panel[~panel.isin(names)]).size:
        raise KeyError(f"{absent.size} genes of the `genes` list are not in {where}.var_names, e.g. "
                       f"{list(absent[:3])}.")  # fmt: skip
    return panel


def align_genes(query: pd.Index, model_genes: pd.Index, *, strip_versions: bool,
                where: str = "The query") -> tuple[np.ndarray, dict]:  # fmt: skip
    """For each model gene, its column in the query (-1: missing), and a summary of the overlap."""
    query = unique_gene_names(query, where=where, strip_versions=strip_versions,
                              fix="Call adata.var_names_make_unique() first, or pass gene_key=.")  # fmt: skip
    model_genes = pd.Index(model_genes)
    if strip_versions:
        model_genes = without_ensembl_versions(model_genes)
    columns = query.get_indexer(model_genes).astype(np.int64)
    present = columns >= 0
    overlap = {
        "n_model_genes": len(model_genes),
        "n_found": int(present.sum()),
        "fraction": float(present.mean()) if len(present) else 0.0,
        "missing": np.asarray(model_genes[~present][:100].astype(str), dtype=object),
    }
    return columns, overlap


def require_overlap(overlap: dict, *, where: str, minimum: float, why: str) -> None:
    """A ValueError ``"Only N of the model's M genes (P%) are in {where}{why}"`` below ``minimum`` (a share)."""
    if overlap["fraction"] < minimum or overlap["n_found"] == 0:
        found, total, share = overlap["n_found"], overlap["n_model_genes"], overlap["fraction"]
        raise ValueError(f"Only {found} of the model's {total} genes ({share:.0%}) are in {where}{why}")


# -- what the matrix holds, checked rows ----------------------------------------------------------


def library_size(X: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Each cell's total over all of its genes (the normalisation's denominator), float64."""
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def input_kind(X: Any, *, where: str) -> str:
    """``"counts"`` or ``"lognorm"`` from the non-zero values of the first cells (:func:`detect_kind`)."""
    head = X[: min(KIND_SAMPLE_CELLS, X.shape[0])]
    values = head.data if sp.issparse(head) else np.asarray(head).ravel()
    return detect_kind(values[values != 0][:KIND_SAMPLE_VALUES], where=where)


def checked_chunks(data: Any, *, layer: str | None, where: str, names: Any = None,
                   accept: Callable[[InputScale], None] | None = None, counts: bool | None = None,
                   **read: Any) -> Iterator[tuple[RowChunk, InputScale | None]]:  # fmt: skip
    """Rows of ``data`` a chunk at a time (CSR), each checked, with what the matrix holds.

    The first chunk's cells tell the scale (:func:`detect_scale`), which ``accept`` may refuse; every
    chunk is then checked (:func:`check_values`: NaN/infinity, negative values, and non-integers when
    the matrix holds counts) with errors naming the cell. A caller that already knows the kind
    passes ``counts`` (no detection; the scale yielded is ``None``). ``read`` goes to
    :func:`~cellmint._utils._chunks.iter_row_chunks` (``chunk_size``, ``rows``, ``progress``, ``desc``).
    """
    scale, positions = None, read.get("rows")  # names and positions: of every row of data
    for chunk in iter_row_chunks(data, layer=layer, fmt="csr", **read):
        named = {"where": where, "names": names, "start": chunk.start, "positions": positions}
        if scale is None and counts is None:
            scale = detect_scale(chunk.X, **named)
            if accept is not None:
                accept(scale)
        check_values(chunk.X, **named, counts=counts if counts is not None else scale.kind == "counts")
        yield chunk, scale


def adata_gene_panel(adata: Any, genes: Any, *, where: str = "adata") -> pd.Index:
    """:func:`gene_panel` of one AnnData (its var_names checked for duplicates first)."""
    names = unique_gene_names(adata.var_names, where=where)
    return gene_panel(names, adata.var, genes, where=where)
