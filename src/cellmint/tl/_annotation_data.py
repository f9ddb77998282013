"""What ``train_annotator`` trains on: a store (streamed) or an AnnData (sparse in memory), one interface.

Both give the gene panel, the classes and codes of every label level, each cell's split part and
the input kind, and make torch loaders over any set of rows with the same block shuffling and
label balancing (``store._sampling``). An AnnData's panel is held as CSR — never densified whole;
data larger than memory goes through a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._panel import InputScale, adata_gene_panel, checked_chunks, library_size, matrix_name
from .._utils._values import checked_labels
from ..models._scale import recover_counts
from ..store import _split
from ..store._loader import data_loader
from ..store._sampling import BALANCE_EXPONENT, MemoryBatches, StoreLoader
from ..store._staged import StagedBatches, store_counts
from ..store._store import Store

#: split values accepted in an AnnData's split column
_PART_CODES = {"train": 0, "val": 1, "validation": 1, "test": 2}


@dataclass
class TrainingData:
    """Cells to train on; ``loader(rows, ...)`` streams any of them."""

    genes: pd.Index
    classes: dict[str, list[str]]
    codes: dict[str, np.ndarray]  # per level, every cell
    parts: np.ndarray  # 0 train, 1 val, 2 test, -1 unused
    kind: str
    summary: dict
    _make_loader: Any = field(repr=False)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # obsm targets, every cell
    _make_staged: Any = field(default=None, repr=False)
    _count_values: Any = field(default=None, repr=False)

    def loader(self, rows: np.ndarray, *, batch_size: int, shuffle: bool, balance: str | None, random_state: int,
               num_workers: int = 0, prefetch: bool = True, distributed: str = "none",
               start_batch: int = 0) -> StoreLoader:  # fmt: skip
        """Batches of ``rows``; ``distributed``: how ranks share them (:mod:`cellmint.store._sampling`)."""
        return self._make_loader(np.asarray(rows, dtype=np.int64), batch_size=batch_size, shuffle=shuffle,
                                 balance=balance, random_state=random_state, num_workers=num_workers,
                                 prefetch=prefetch, distributed=distributed, start_batch=start_batch)  # fmt: skip

    def stored_values(self, rows: np.ndarray) -> int:
        """Stored (non-zero) values of ``rows``: what staging them on a device costs (:mod:`cellmint.store._staged`)."""
        return self._count_values(np.asarray(rows, dtype=np.int64))

    def staged_loader(self, rows: np.ndarray, *, device, batch_size: int, balance: str | None, random_state: int,
                      distributed: str = "none", start_batch: int = 0) -> StoreLoader:  # fmt: skip
        """Batches of ``rows`` from their counts copied to ``device`` once (:mod:`cellmint.store._staged`)."""
        return self._make_staged(np.asarray(rows, dtype=np.int64), device=device, batch_size=batch_size,
                                 balance=balance, random_state=random_state, distributed=distributed,
                                 start_batch=start_batch)  # fmt: skip


def from_store(store: Store, label_keys: list[str], split: str) -> TrainingData:
    missing = [key for key in label_keys if key not in store.label_keys]
    if missing:
        raise KeyError(f"The store has no labels {missing}; its label keys: {store.label_keys}.")
    labels = store.labels
    classes = {key: list(map(str, labels[key].categories)) for key in label_keys}
    codes = {key: np.asarray(labels[key].codes, dtype=np.int64) for key in label_keys}
    finest = label_keys[-1]

    def make_loader(rows, *, batch_size, shuffle, balance, random_state, num_workers, prefetch, distributed,
                    start_batch):  # fmt: skip
        return store.loader(batch_size, rows=rows, shuffle=shuffle, balance=balance, label_key=finest,
                            random_state=random_state, num_workers=num_workers, prefetch=prefetch,
                            distributed=distributed, start_batch=start_batch)  # fmt: skip

    def make_staged(rows, *, device, batch_size, balance, random_state, distributed, start_batch):
        streamed = store.loader(batch_size, rows=rows, shuffle=False, label_key=finest, prefetch=True).dataset
        matrix = store_counts(streamed, rows)  # opens the dataset: its library sizes and labels are read
        dataset = StagedBatches(
            None, rows, list(store.label_keys), batch_size=batch_size, shuffle=True, random_state=random_state,
            balance_codes=streamed._labels[finest][rows] if balance else None,
            balance_exponent=BALANCE_EXPONENT[balance], matrix=matrix, library=streamed._library,
            codes=streamed._labels, distributed=distributed, start_batch=start_batch, device=device,
        )  # fmt: skip
        return data_loader(dataset)

    def count_values(rows):
        indptr = store._array("X/indptr").read(0, int(rows[-1]) + 2) if len(rows) else np.zeros(1, np.int64)
        return int((indptr[rows + 1] - indptr[rows]).sum())

    summary = {"source": "store", "path": str(store.path), "split": split, "n_obs": store.n_obs}
    return TrainingData(store.var_names, classes, codes, store.split_codes(split), "counts", summary, make_loader,
                        _make_staged=make_staged, _count_values=count_values)  # fmt: skip


def _label_codes(adata, key: str) -> tuple[np.ndarray, list[str]]:
    if key not in adata.obs.columns:
        raise KeyError(f"adata.obs has no label column {key!r}; columns: {list(adata.obs.columns)}.")
    categorical = pd.Categorical(checked_labels(adata.obs[key], f"Label {key!r}"))
    return np.asarray(categorical.codes, dtype=np.int64), list(categorical.categories)


def _parts(adata, split: str, codes: np.ndarray, group_key: str | None, random_state: int) -> tuple[np.ndarray, str]:
    if split in adata.obs.columns:
        values = adata.obs[split].astype(str).str.lower()
        unknown = sorted(set(values) - set(_PART_CODES))
        if unknown:
            raise ValueError(f"Split column {split!r} holds {unknown}; expected train / val / test.")
        return values.map(_PART_CODES).to_numpy(dtype=np.int8), f"obs[{split!r}]"
    groups = None
    if group_key is not None:
        if group_key not in adata.obs.columns:
            raise KeyError(f"adata.obs has no group column {group_key!r}.")
        groups = adata.obs[group_key].astype(str).to_numpy()
    parts = _split.assign(codes, groups, n_obs=adata.n_obs, **_split.DEFAULT_FRACTIONS,
                          random_state=random_state)  # fmt: skip
    return parts, f"random 80/10/10{'' if group_key is None else f' by {group_key}'} (seed {random_state})"


def _embeddings(adata, keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for key in keys:
        if key not in adata.obsm:
            raise KeyError(f"adata.obsm has no {key!r}; it has {list(adata.obsm.keys())}.")
        values = np.asarray(adata.obsm[key], dtype=np.float32)
        if values.ndim != 2 or not np.isfinite(values).all():
            raise ValueError(f"adata.obsm[{key!r}] must be a finite cells × dimensions array.")
        out[key] = values
    return out


def _declared(scale: InputScale, declared: str, where: str) -> InputScale:
    """The detected scale, after checking it against what the caller declared (``input=``): verified, not trusted."""
    if declared == "counts" and scale.kind != "counts":
        raise ValueError(f"input='counts', but {where} holds {scale.describe()}. Pass input='auto' (recognised log "
                         "scales are turned back into counts) or the raw counts with `layer=`.")  # fmt: skip
    if declared == "lognorm" and scale.kind == "counts":
        raise ValueError(f"input='lognorm', but {where} holds raw counts (non-negative integers only). Pass "
                         "input='auto' or 'counts', or the log-normalised values with `layer=`.")  # fmt: skip
    return scale


def from_anndata(adata, label_keys: list[str], *, split: str, layer: str | None, genes: Any, group_key: str | None,
                 input_kind: str, random_state: int, embedding_keys: list[str]) -> TrainingData:  # fmt: skip
    """Training cells of an AnnData: the panel as CSR in memory, values checked in every cell.

    What the matrix holds is told from its first cells (:func:`~cellmint.models._scale.detect_scale`):
    counts are kept; a recognised log scale (log1p of CP10k, log2(CPM + 1), ...) is turned back into
    counts, so the model is a counts model that accepts any recognised query; values of an
    unrecognised scale are used as they are (``lognorm`` recipe).
    """
    panel = adata_gene_panel(adata, genes)
    embeddings = _embeddings(adata, embedding_keys)
    columns = pd.Index(adata.var_names.astype(str)).get_indexer(panel)
    labels = {key: _label_codes(adata, key) for key in label_keys}
    where = matrix_name(layer, "adata.")
    blocks, library, scale = [], [], None
    for chunk, scale in checked_chunks(adata, layer=layer, where=where, names=adata.obs_names,
                                       accept=lambda found: _declared(found, input_kind, where)):  # fmt: skip
        X = recover_counts(chunk.X, scale) if scale.kind == "log" else chunk.X
        library.append(library_size(X))
        blocks.append(X[:, columns].astype(np.float32))
    if scale is None:
        raise ValueError("The AnnData has no cells to train on.")
    matrix = sp.csr_matrix(sp.vstack(blocks, format="csr"))
    matrix.sort_indices()
    library = np.concatenate(library)
    kind = "counts" if scale.recoverable else "lognorm"
    codes = {key: c for key, (c, _) in labels.items()}
    parts, how = _parts(adata, split, codes[label_keys[-1]], group_key, random_state)
    finest = label_keys[-1]

    def planned(kind, rows, *, balance, **options):
        """A dataset of ``kind`` over ``rows`` (its matrix in ``options``), balanced on the finest level."""
        return kind(None, rows, list(label_keys), balance_codes=codes[finest][rows] if balance else None,
                    balance_exponent=BALANCE_EXPONENT[balance], library=library, codes=codes, **options)  # fmt: skip

    def make_loader(rows, *, batch_size, shuffle, balance, random_state, num_workers, prefetch, distributed,
                    start_batch):  # fmt: skip
        dataset = planned(MemoryBatches, rows, balance=balance, matrix=matrix, batch_size=batch_size, shuffle=shuffle,
                          random_state=random_state, prefetch=prefetch, distributed=distributed,
                          start_batch=start_batch)  # fmt: skip
        return data_loader(dataset, num_workers=num_workers)

    def make_staged(rows, *, device, batch_size, balance, random_state, distributed, start_batch):
        keep = np.zeros(matrix.shape[0], dtype=np.float32)
        keep[rows] = 1.0
        staged = sp.csr_matrix(sp.diags(keep) @ matrix)  # only these cells' counts go to the device
        staged.eliminate_zeros()
        dataset = planned(StagedBatches, rows, balance=balance, matrix=staged, batch_size=batch_size, shuffle=True,
                          random_state=random_state, distributed=distributed, start_batch=start_batch,
                          device=device)  # fmt: skip
        return data_loader(dataset)

    def count_values(rows):
        return int((matrix.indptr[rows + 1] - matrix.indptr[rows]).sum())

    summary = {"source": "anndata", "split": how, "n_obs": int(adata.n_obs), "layer": layer or "",
               "input": scale.to_dict()}  # fmt: skip
    classes = {key: c for key, (_, c) in labels.items()}
    return TrainingData(panel, classes, codes, parts, kind, summary, make_loader, embeddings, make_staged,
                        count_values)  # fmt: skip
