"""Mini-batches from a store for torch: block shuffling, label balancing, workers and ranks.

An epoch is planned from indices alone, before any read: the split's rows (repeated or left out by
label-balancing weights when asked), cut into blocks of consecutive rows, blocks shuffled, blocks
dealt to shards (DataLoader workers × distributed ranks), then ``fetch_blocks`` blocks at a time
read together (contiguous reads), shuffled in memory and cut into batches. Planning first makes
epochs reproducible from ``(random_state, epoch)`` and lets a run resume mid-epoch without reading
the batches it skips. Each worker opens the store itself, so fork and spawn both work.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

BALANCE_EXPONENT = {None: 0.0, "sqrt": 0.5, "inverse": 1.0}
#: rows between two wanted rows that are read through rather than starting a new read (reads cost ~1 ms)
MAX_GAP = 256


def multiplicities(labels: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Visits of every cell in one epoch so that class c is drawn with probability ∝ n_c^(1 - exponent).

    Each cell's expected visits are ``n · w / Σw`` with ``w = n_c^-exponent``; the whole part is kept
    and the fraction drawn, so the epoch has about ``n`` cells and no class is cut to the rarest.
    """
    counts = np.bincount(labels)
    weights = counts[labels].astype(np.float64) ** -exponent
    expected = len(labels) * weights / weights.sum()
    whole = np.floor(expected)
    return (whole + (rng.random(len(labels)) < expected - whole)).astype(np.int64)


@dataclass
class StoreBatches(torch.utils.data.IterableDataset):
    """Iterable dataset of mini-batches from a store (see module docstring); built by ``Store.loader``."""

    path: Path
    rows: np.ndarray
    label_keys: list[str]
    batch_size: int = 256
    shuffle: bool = True
    balance_codes: np.ndarray | None = None
    balance_exponent: float = 0.0
    random_state: int = 0
    drop_last: bool = False
    dense: bool = True
    block_size: int = 256
    fetch_blocks: int = 16
    start_batch: int = 0
    epoch: int = 0
    _root: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    # -- planning (indices only) ---------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank * workers + worker, world * workers

    def plan(self, shard: int = 0, n_shards: int = 1) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Fetches of one shard in this epoch: (rows to read, batches as row arrays), in order."""
        rng = np.random.default_rng([self.random_state, self.epoch])
        rows = self.rows
        if self.balance_codes is not None and self.balance_exponent > 0:
            rows = np.repeat(rows, multiplicities(self.balance_codes, self.balance_exponent, rng))
        blocks = [rows[i : i + self.block_size] for i in range(0, len(rows), self.block_size)]
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        blocks = blocks[shard::n_shards]
        fetches, carry = [], np.empty(0, dtype=np.int64)
        for f in range(0, len(blocks), self.fetch_blocks):
            pool = np.concatenate([carry, *blocks[f : f + self.fetch_blocks]])
            if self.shuffle:
                pool = pool[rng.permutation(len(pool))]
            last = f + self.fetch_blocks >= len(blocks)
            cut = len(pool) if last else len(pool) - len(pool) % self.batch_size
            batches = [pool[i : i + self.batch_size] for i in range(0, cut, self.batch_size)]
            if last and self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            carry = pool[cut:]
            if batches:
                fetches.append((np.unique(np.concatenate(batches)), batches))
        return fetches

    def __len__(self) -> int:
        return sum(len(b) for _, b in self.plan()) - self.start_batch

    # -- reading ------------------------------------------------------------------------------
    def _open(self) -> None:
        """Open the store and load the per-cell vectors once (8 bytes + a few per cell), in this process."""
        self._root = zarr.open_group(self.path, mode="r")
        self._data, self._indices = self._root["X/data"], self._root["X/indices"]
        n = int(self.rows.max()) + 2 if len(self.rows) else 1
        self._indptr = np.asarray(self._root["X/indptr"][:n], dtype=np.int64)
        self._library = np.asarray(self._root["obs/library_size"][: n - 1])
        self._labels = {key: np.asarray(self._root[f"labels/{key}"][: n - 1]) for key in self.label_keys}

    def _read(self, rows: np.ndarray):
        """Counts of sorted unique ``rows``: one read per span of nearby rows (gaps up to MAX_GAP read through)."""
        data, indices = [], []
        for span in np.split(rows, np.flatnonzero(np.diff(rows) > MAX_GAP) + 1):
            first, stop = int(span[0]), int(span[-1]) + 1
            lo, hi = self._indptr[first], self._indptr[stop]
            block_data, block_indices = np.asarray(self._data[lo:hi]), np.asarray(self._indices[lo:hi])
            if stop - first == len(span):  # every row of the span is wanted
                data.append(block_data)
                indices.append(block_indices)
                continue
            starts, stops = self._indptr[span] - lo, self._indptr[span + 1] - lo
            take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
            data.append(block_data[take])
            indices.append(block_indices[take])
        lengths = self._indptr[rows + 1] - self._indptr[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        labels = {key: codes[rows] for key, codes in self._labels.items()}
        return indptr, np.concatenate(data), np.concatenate(indices), labels, self._library[rows]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_root"] = None  # an open store is never pickled into a worker
        for cached in ("_indptr", "_library", "_labels", "_data", "_indices"):
            state.pop(cached, None)
        return state

    def _batch(self, batch: np.ndarray, rows: np.ndarray, fetched, n_vars: int) -> dict:
        indptr, data, indices, labels, library = fetched
        position = np.searchsorted(rows, batch)
        starts, stops = indptr[position], indptr[position + 1]
        lengths = stops - starts
        take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        cols, values = indices[take].astype(np.int64), data[take].astype(np.float32)
        if self.dense:
            X = np.zeros((len(batch), n_vars), dtype=np.float32)
            X[np.repeat(np.arange(len(batch)), lengths), cols] = values
            X = torch.from_numpy(X)
        else:
            crow = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's notes on its beta sparse CSR support
                X = torch.sparse_csr_tensor(crow, torch.from_numpy(cols), torch.from_numpy(values),
                                            size=(len(batch), n_vars), check_invariants=False)  # fmt: skip
        return {
            "X": X,
            "labels": {key: torch.from_numpy(codes[position].astype(np.int64)) for key, codes in labels.items()},
            "library_size": torch.from_numpy(library[position].astype(np.float32)),
            "index": torch.from_numpy(batch.astype(np.int64)),
        }

    def __iter__(self) -> Iterator[dict]:
        if self._root is None:
            self._open()  # here: in each worker, after fork or spawn
        n_vars = int(self._root["var/names"].shape[0])
        skip = self.start_batch
        for rows, batches in self.plan(*self._shard()):
            if skip >= len(batches):
                skip -= len(batches)
                continue
            fetched = self._read(rows)
            for batch in batches[skip:]:
                yield self._batch(batch, rows, fetched, n_vars)
            skip = 0


class StoreLoader:
    """What ``Store.loader`` returns: a torch DataLoader over :class:`StoreBatches`, with ``set_epoch``.

    Batches are moved to ``device`` when one is given (non-blocking from pinned memory).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | None):
        self.loader, self.device = loader, device
        self.dataset = loader.dataset

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch``."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield batch if self.device is None else _to(batch, self.device)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
