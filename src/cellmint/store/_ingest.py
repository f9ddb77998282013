"""Stream inputs into a store, batch by batch: the one loop behind ``build_store`` and ``Store.append``.

Three stages overlap: the next chunk is read in a background thread, the current one is checked and
mapped onto the gene panel by one numba pass (``_prepare``), and the previous one is compressed,
written and committed by a writer thread. At most one batch waits for its commit, so memory stays
at a few chunks (``batch_cells`` cells each, about 256 MiB by default).
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._chunks import iter_row_chunks
from .._utils._values import NEGATIVE, NONFINITE, NONINTEGER, OK, value_error
from ._inputs import Input, column_map
from ._writer import StoreWriter


@numba.njit(nogil=True, cache=True)
def _prepare(indptr, indices, data, columns, out_indptr, out_indices, out_data, library_size, n_genes, copy):
    """One pass over a canonical CSR chunk: check the counts, sum them, map genes onto the panel.

    ``library_size``/``n_genes`` are over all genes of the input. With ``copy`` the values of panel
    genes are written to ``out_*`` (genes outside the panel dropped); without, the caller keeps the
    input arrays (every gene in the panel, same order). Returns (problem code, value position,
    whether the output's gene indices are sorted within rows, stored values in the output).
    """
    k = 0
    out_indptr[0] = 0
    ordered = True
    for row in range(len(indptr) - 1):
        total = 0.0
        detected = 0
        previous = -1
        for j in range(indptr[row], indptr[row + 1]):
            v = float(data[j])
            if not np.isfinite(v):
                return NONFINITE, j, ordered, k
            if v < 0:
                return NEGATIVE, j, ordered, k
            if v != np.floor(v):
                return NONINTEGER, j, ordered, k
            total += v
            if v > 0:
                detected += 1
            if copy:
                column = columns[indices[j]]
                if column >= 0:
                    if column <= previous:
                        ordered = False
                    previous = column
                    out_indices[k] = column
                    out_data[k] = v
                    k += 1
        out_indptr[row + 1] = k if copy else indptr[row + 1]
        library_size[row] = total
        n_genes[row] = detected
    return OK, -1, ordered, k


def prepare_chunk(X: sp.csr_matrix, columns: np.ndarray, n_panel: int, *, where: str, first_row: int):
    """Check a chunk's counts and map it onto the panel: ``(indptr, indices, data, library_size, n_genes)``."""
    if X.dtype.kind not in "fiu":
        raise ValueError(f"{where} holds values of dtype {X.dtype}, not numbers.")
    if not X.has_canonical_format:  # unsorted or duplicated gene indices: add duplicates up first
        X = X.copy()
        X.sum_duplicates()
    data = X.data.astype(np.float32) if X.dtype == np.float16 else X.data  # numba has no float16
    rows, nnz = X.shape[0], X.nnz
    identity = len(columns) == X.shape[1] and bool(np.all(columns == np.arange(len(columns))))
    copy = not (identity and data.dtype == np.float32 and X.indices.dtype == np.int32)
    out_indptr = np.empty(rows + 1, dtype=np.int64)
    out_indices = np.empty(nnz if copy else 0, dtype=np.int32)
    out_data = np.empty(nnz if copy else 0, dtype=np.float32)
    library_size, n_genes = np.empty(rows, dtype=np.float64), np.empty(rows, dtype=np.int32)
    code, position, ordered, kept = _prepare(
        X.indptr, X.indices, data, columns, out_indptr, out_indices, out_data, library_size, n_genes, copy
    )
    if code != OK:
        row = first_row + int(np.searchsorted(X.indptr, position, side="right")) - 1
        raise value_error(code, data[position], where=where, cells=f"cell {row}",
                          expectation="A store holds raw counts", hint="Pass the counts with `layer=`.")  # fmt: skip
    if not copy:
        return out_indptr, X.indices, data, library_size, n_genes
    out = sp.csr_matrix((out_data[:kept], out_indices[:kept], out_indptr), shape=(rows, n_panel))
    if not ordered:  # the panel orders genes differently from the input
        out.sort_indices()
    return out.indptr, out.indices, out.data, library_size, n_genes


def check_inputs(inputs: list[Input], keys: list[str]) -> None:
    """Every input has cells and genes, and carries the obs columns the store keeps."""
    for inp in inputs:
        if inp.adata.n_obs == 0 or inp.adata.n_vars == 0:
            raise ValueError(f"{inp.name} is empty ({inp.adata.n_obs} cells × {inp.adata.n_vars} genes).")
        missing = [k for k in keys if k not in inp.adata.obs.columns]
        if missing:
            raise KeyError(f"{inp.name} has no obs column {missing}; its columns: {list(inp.adata.obs.columns)}.")


def ingest(writer: StoreWriter, inputs: list[Input], *, first_index: int, progress: bool | None) -> None:
    """Write every uncommitted batch of ``inputs`` (store input numbers ``first_index``, ``first_index + 1``, …)."""
    params = writer.manifest["params"]
    panel = pd.Index(writer.manifest["genes"])
    layer, strip = params["layer"], params["strip_ensembl_versions"]
    keys = params["label_keys"] + params["obs_keys"] + ([params["group_key"]] if params["group_key"] else [])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellmint-commit") as committer:
        pending: Future | None = None
        for offset, inp in enumerate(inputs):
            index = first_index + offset
            columns = column_map(inp, panel, strip)
            if (columns < 0).all():
                raise ValueError(f"{inp.name} shares no gene with the store's panel.")
            where = f"{inp.name}: " + ("X" if layer is None else f"layers[{layer!r}]")
            for chunk in iter_row_chunks(
                inp.data, layer=layer, chunk_size=params["batch_cells"], fmt="csr", start=writer.resume_row(index),
                prefetch=True, progress=progress, desc=inp.name,
            ):  # fmt: skip
                indptr, indices, data, library_size, n_genes = prepare_chunk(
                    chunk.X, columns, len(panel), where=where, first_row=chunk.start
                )
                batch = writer.encode(
                    input_index=index, input_start=chunk.start, indptr=indptr, indices=indices, data=data,
                    obs=inp.adata.obs.iloc[chunk.start : chunk.stop][keys], library_size=library_size,
                    n_genes=n_genes,
                )  # fmt: skip
                if pending is not None:
                    pending.result()  # at most one batch waits for its commit
                pending = committer.submit(writer.commit, batch)
        if pending is not None:
            pending.result()


def committed_rows_problem(writer: StoreWriter, inp: Input, index: int) -> str | None:
    """Why ``inp`` does not reproduce the rows the store committed from input ``index`` (``None``: it does).

    A failed build or append resumes with a fixed input only when the rows already committed from it
    come out the same (every per-batch checksum of the counts and the per-cell arrays matches).
    """
    from ._writer import batch_checksum, batch_checksums

    m = writer.manifest
    params, panel = m["params"], pd.Index(m["genes"])
    keys = params["label_keys"] + params["obs_keys"] + ([params["group_key"]] if params["group_key"] else [])
    columns = column_map(inp, panel, params["strip_ensembl_versions"])
    where = f"{inp.name}: " + ("X" if params["layer"] is None else f"layers[{params['layer']!r}]")
    categories = writer._categories
    writer._categories = copy.deepcopy(categories)  # encoding for comparison must not add categories
    try:
        for batch in m["batches"]:
            if batch["input"] != index:
                continue
            start, stop = batch["input_start"], batch["input_stop"]
            if stop > inp.n_obs:
                return f"it has {inp.n_obs} cells, but rows up to {stop} were committed from it"
            chunks = iter_row_chunks(inp.data, layer=params["layer"], chunk_size=stop - start, fmt="csr", start=start)
            try:
                chunk = next(chunks)
            finally:
                chunks.close()  # closes the file it opened
            try:
                indptr, indices, data, library_size, n_genes = prepare_chunk(
                    chunk.X, columns, len(panel), where=where, first_row=start
                )
                encoded = writer.encode(input_index=index, input_start=start, indptr=indptr, indices=indices, data=data,
                                        obs=inp.adata.obs.iloc[start:stop][keys], library_size=library_size,
                                        n_genes=n_genes)  # fmt: skip
            except (ValueError, KeyError) as err:
                return f"its rows {start}:{stop}, committed before, now fail: {err}"
            if (batch_checksum(indptr, indices, data) != batch["crc32"]
                    or batch_checksums(encoded) != batch.get("checksums")):  # fmt: skip
                return f"its rows {start}:{stop} differ from those the store committed"
    finally:
        writer._categories = categories
    return None
