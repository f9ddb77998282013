"""``cm.pp.cell_sentences``: each cell as text, the names of its most expressed genes, highest first.

Text and omics contrastive models read a cell as a "sentence" of gene names ranked by expression,
and identify it by a "cell-id sentence" (its name) when its embedding is looked up elsewhere. Rows
are read a chunk at a time with :func:`~cellmint.io.iter_row_chunks`, ranked by one numba pass over
the chunk's stored values, and joined into strings; memory stays near one chunk plus the sentences.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import _logging as logg
from .._utils._chunks import iter_row_chunks, open_root
from .._utils._docs import doc_params
from .._utils._panel import matrix_name, unique_gene_names
from .._utils._values import validate_chunk


@numba.njit(nogil=True, cache=True)
def _kth_smallest(values, m, k, heap):
    """The ``k``-th smallest of ``values[:m]``, with a max-heap of the ``k`` smallest seen so far.

    Counts repeat a few small values many times, where quickselect (``np.partition``) slows down;
    here most values fail one comparison with the heap's top.
    """
    for i in range(k):  # heapify the first k values (sift up)
        heap[i] = values[i]
        j = i
        while j > 0 and heap[(j - 1) // 2] < heap[j]:
            heap[(j - 1) // 2], heap[j] = heap[j], heap[(j - 1) // 2]
            j = (j - 1) // 2
    for i in range(k, m):
        if values[i] < heap[0]:
            heap[0] = values[i]
            j = 0
            while True:  # sift down
                left, largest = 2 * j + 1, j
                if left < k and heap[left] > heap[largest]:
                    largest = left
                if left + 1 < k and heap[left + 1] > heap[largest]:
                    largest = left + 1
                if largest == j:
                    break
                heap[j], heap[largest] = heap[largest], heap[j]
                j = largest
    return heap[0]


@numba.njit(nogil=True, cache=True)
def _top_genes(indptr, indices, data, n_genes):
    """Column indices of each row's ``n_genes`` largest positive values, largest first.

    Rows must hold sorted, unique column indices, so that equal values keep gene order. Per row, the
    ``n_genes``-th largest value is found with a heap, the genes above it and the first ones equal to
    it are kept, and only those are sorted (stably). Returns
    ``(ptr, genes, first_negative_row)`` (``-1`` when none).
    """
    n_rows = len(indptr) - 1
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    widest = 0
    for r in range(n_rows):
        n_pos = 0
        for p in range(indptr[r], indptr[r + 1]):
            if data[p] < 0:
                return ptr, np.empty(0, dtype=np.int64), r
            if data[p] > 0:
                n_pos += 1
        ptr[r + 1] = ptr[r] + min(n_pos, n_genes)
        widest = max(widest, n_pos)
    genes = np.empty(ptr[n_rows], dtype=np.int64)
    values = np.empty(widest, dtype=np.float64)
    columns = np.empty(widest, dtype=np.int64)
    heap = np.empty(min(widest, n_genes), dtype=np.float64)
    kept_values = np.empty(min(widest, n_genes), dtype=np.float64)
    kept_columns = np.empty(min(widest, n_genes), dtype=np.int64)
    for r in range(n_rows):
        m = 0
        for p in range(indptr[r], indptr[r + 1]):
            if data[p] > 0:
                values[m] = -data[p]  # negated: ascending sorts put the largest first
                columns[m] = indices[p]
                m += 1
        n_keep = ptr[r + 1] - ptr[r]
        cut = _kth_smallest(values, m, n_keep, heap) if 0 < n_keep < m else np.inf
        n_below = 0  # values strictly beyond the cut (larger expression)
        for i in range(m):
            if values[i] < cut:
                n_below += 1
        ties_left = n_keep - n_below
        k = 0
        for i in range(m):
            if values[i] < cut or (values[i] == cut and ties_left > 0):
                if values[i] == cut:
                    ties_left -= 1
                kept_values[k] = values[i]
                kept_columns[k] = columns[i]
                k += 1
        order = np.argsort(kept_values[:k], kind="mergesort")
        for j in range(k):
            genes[ptr[r] + j] = kept_columns[order[j]]
    return ptr, genes, -1


def _gene_words(var: pd.DataFrame, gene_name_key: str | None) -> np.ndarray:
    """Gene names as the words of the sentences; refuses names that would make a sentence ambiguous."""
    if gene_name_key is None:
        names, where = pd.Series(var.index, dtype=object), "var_names"
    elif gene_name_key not in var.columns:
        raise KeyError(f"gene_name_key {gene_name_key!r} is not a column of var; columns: {list(var.columns)}.")
    else:
        names, where = pd.Series(var[gene_name_key].to_numpy(dtype=object)), f"var[{gene_name_key!r}]"
    if names.isna().any():
        raise ValueError(f"{where} has {int(names.isna().sum())} missing gene names; fill them in first.")
    names = names.astype(str)
    blank = names.str.contains(r"\s", regex=True) | (names == "")
    if blank.any():
        raise ValueError(
            f"{where} has {int(blank.sum())} empty names or names with whitespace (e.g. {list(names[blank][:3])}): "
            "sentences are split on spaces, so these would read as other words."
        )
    unique_gene_names(names, where=where, consequence="two genes would be the same word in a sentence",
                      fix="Call adata.var_names_make_unique() or pick another gene_name_key.")  # fmt: skip
    return names.to_numpy(dtype=object)


def _sentences(data, words: np.ndarray, *, n_genes, layer, chunk_size, progress) -> np.ndarray:
    where = matrix_name(layer)
    on_disk = not isinstance(data, AnnData) or data.isbacked  # reading ahead pays off only for disk reads
    parts = [np.empty(0, dtype=object)]
    for chunk in iter_row_chunks(data, layer=layer, chunk_size=chunk_size, progress=progress,
                                 desc="cell sentences", prefetch=on_disk):  # fmt: skip
        validate_chunk(chunk, where=where, require_counts=False)
        X = chunk.X
        if not sp.issparse(X):  # scipy and numba have no float16
            X = sp.csr_matrix(X.astype(np.float32) if X.dtype == np.float16 else X)
        elif not X.has_canonical_format:  # the chunk may share memory with the input: sort a copy
            X = X.copy()
            X.sum_duplicates()
        ptr, genes, negative = _top_genes(X.indptr, X.indices, X.data, n_genes)
        if negative >= 0:
            raise ValueError(
                f"{where} has negative values (cell {chunk.start + negative}): sentences rank expression, so they "
                "need counts or normalised expression, not scaled data."
            )
        listed = words[genes].tolist()
        sentences = np.empty(len(ptr) - 1, dtype=object)
        sentences[:] = [" ".join(listed[ptr[i] : ptr[i + 1]]) for i in range(len(ptr) - 1)]
        parts.append(sentences)
    return np.concatenate(parts)


def _read_file(path: Path) -> tuple[pd.Index, pd.DataFrame]:
    import anndata as ad

    with open_root(path) as root:
        obs, var = ad.io.read_elem(root["obs"]), ad.io.read_elem(root["var"])
    return obs.index, var


@doc_params(
    doc_n_genes="""\
n_genes
    Genes per sentence (fewer for cells with fewer expressed genes; an empty sentence for a cell with
    none). 100 keeps ``obs`` near 1 kB per cell; long-context models take thousands.""",
)
def cell_sentences(
    adata: AnnData | str | Path,
    *,
    n_genes: int = 100,
    gene_name_key: str | None = None,
    layer: str | None = None,
    key_added: str = "cell_sentence",
    chunk_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
) -> AnnData | pd.DataFrame | None:
    """Write each cell as a sentence: the names of its most expressed genes, highest first.

    A cell's sentence lists the genes with the largest values in ``X`` (or ``layer``), separated by
    single spaces. Genes with a zero value never appear. Equal values keep the order of the genes in
    ``var`` (a stable ranking), so the same data always give the same sentence. Along with it, the
    *cell-id sentence* is the cell's name (``obs_names``), the sentence embedding-based models use
    to look the cell up (:func:`cellmint.io.to_hf_dataset` takes either).

    Gene names must be unique, non-empty and free of whitespace (an error otherwise): a duplicated
    name would stand for two genes in one sentence. NaN/infinite values are refused, and so are
    negative values (scaled data rank by z-score, not by expression).

    Parameters
    ----------
    {doc_adata}
    {doc_n_genes}
    gene_name_key
        ``var`` column with the gene names to write (e.g. gene symbols when ``var_names`` are Ensembl
        ids); ``None`` uses ``var_names``.
    {doc_layer} Counts or normalised expression; ranks are the same for both.
    key_added
        ``obs`` column of the sentences; the cell-id sentence goes to ``f"{{key_added}}_id"``.
    {doc_chunk_size}
    {doc_copy}
    {doc_progress}

    Returns
    -------
    For a path (opened read-only): a :class:`pandas.DataFrame` (index: cell names) with the two
    columns below. Otherwise ``None`` (a copy with ``copy=True``), and writes:

    ``adata.obs[key_added]`` (str)
        The gene sentence of every cell.
    ``adata.obs[f"{{key_added}}_id"]`` (str)
        The cell-id sentence: the cell's name.
    ``adata.uns[key_added]``
        ``{{"params": {{"n_genes": ..., "gene_name_key": ..., "layer": ..., "id_key": ...}}}}``
        (``gene_name_key`` and ``layer`` only when given).

    Examples
    --------
    >>> import cellmint as cm
    >>> adata = cm.datasets.cellbench()
    >>> cm.pp.cell_sentences(adata, n_genes=5)
    >>> len(adata.obs["cell_sentence"].iloc[0].split())
    5
    """
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer, not {n_genes!r}.")
    id_key = f"{key_added}_id"
    if isinstance(adata, str | Path):
        obs_names, var = _read_file(Path(adata))
    elif isinstance(adata, AnnData):
        if adata.isbacked and adata.is_view and not copy:
            raise ValueError(
                "adata is a view of a backed AnnData, whose obs cannot be annotated in place: call cell_sentences "
                "on the backed AnnData itself, or on adata.to_memory()."
            )
        obs_names, var = adata.obs_names, adata.var
    else:
        raise TypeError(f"`adata` must be an AnnData or a path to .h5ad/.zarr, not {type(adata).__name__}.")
    words = _gene_words(var, gene_name_key)
    start = logg.info(f"writing cell sentences of the top {n_genes} genes")
    data = Path(adata) if isinstance(adata, str | Path) else adata
    sentences = _sentences(data, words, n_genes=int(n_genes), layer=layer, chunk_size=chunk_size, progress=progress)
    ids = np.asarray(obs_names, dtype=str).astype(object)
    logg.info("    finished", time=start)
    if isinstance(adata, str | Path):
        return pd.DataFrame({key_added: sentences, id_key: ids}, index=pd.Index(obs_names, dtype=object))
    if copy:
        adata = adata.copy()
    adata.obs[key_added] = sentences
    adata.obs[id_key] = ids
    params = {"n_genes": int(n_genes), "gene_name_key": gene_name_key, "layer": layer, "id_key": id_key}
    adata.uns[key_added] = {"params": {k: v for k, v in params.items() if v is not None}}  # h5ad cannot hold None
    logg.hint(f"added\n    {key_added!r}, {id_key!r} (adata.obs)\n    {key_added!r} (adata.uns)")
    return adata if copy else None
