"""Stream inputs into a store, batch by batch: the one loop behind ``build_store`` and ``Store.append``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._chunks import iter_row_chunks
from .._utils._values import validate_chunk
from ._inputs import Input, column_map
from ._writer import StoreWriter


def _panel_rows(X: sp.csr_matrix, columns: np.ndarray, n_panel: int) -> sp.csr_matrix:
    """Re-index a chunk's genes to the panel (genes outside it dropped), canonical CSR, without a COO detour."""
    X.sum_duplicates()  # canonical input: sorted gene indices, duplicates added up
    target = columns[X.indices]
    keep = target >= 0
    if keep.all():  # every gene of the input is in the panel: only the column numbers change
        out = sp.csr_matrix((X.data, target, X.indptr), shape=(X.shape[0], n_panel))
    else:
        kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        out = sp.csr_matrix((X.data[keep], target[keep], kept_before[X.indptr]), shape=(X.shape[0], n_panel))
    kept = columns[columns >= 0]
    if len(kept) > 1 and np.any(np.diff(kept) < 0):  # the panel orders genes differently from the input
        out.sort_indices()
    return out


def check_keys(inputs: list[Input], keys: list[str]) -> None:
    """Every input carries the obs columns the store keeps."""
    for inp in inputs:
        missing = [k for k in keys if k not in inp.adata.obs.columns]
        if missing:
            raise KeyError(f"{inp.name} has no obs column {missing}; its columns: {list(inp.adata.obs.columns)}.")


def ingest(writer: StoreWriter, inputs: list[Input], *, first_index: int, progress: bool | None) -> None:
    """Write every uncommitted batch of ``inputs`` (store input numbers ``first_index``, ``first_index + 1``, …)."""
    params = writer.manifest["params"]
    panel = pd.Index(writer.manifest["genes"])
    layer, strip = params["layer"], params["strip_ensembl_versions"]
    keys = params["label_keys"] + params["obs_keys"] + ([params["group_key"]] if params["group_key"] else [])
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
            validate_chunk(chunk, where=where, require_counts=True, expectation="A store holds raw counts",
                           hint="Pass the layer of counts with `layer=`.")  # fmt: skip
            X = chunk.X
            obs = inp.adata.obs.iloc[chunk.start : chunk.stop]
            writer.write_batch(
                _panel_rows(X, columns, len(panel)), input_index=index, input_start=chunk.start, obs=obs[keys],
                names=np.asarray(obs.index, dtype=str),
                library_size=np.asarray(X.sum(axis=1, dtype=np.float64)).ravel(),
                n_genes=np.asarray((X > 0).sum(axis=1)).ravel(),
            )  # fmt: skip
