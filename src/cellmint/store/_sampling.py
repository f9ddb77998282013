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

import numba
import numpy as np
import scipy.sparse as sp
import torch

from .._utils._threads import background
from ._arrays import ChunkedArray, read_spans

BALANCE_EXPONENT = {None: 0.0, "sqrt": 0.5, "inverse": 1.0}
#: rows between two wanted rows that are read through rather than starting a new read
MAX_GAP = 64


@numba.njit(nogil=True, cache=True)
def _densify(positions, starts, lengths, data, indices, out):
    """Write the fetched rows ``positions`` into the dense batch ``out`` (zeroed row by row here)."""
    for i in range(len(positions)):
        out[i, :] = 0
        p = positions[i]
        for j in range(starts[p], starts[p] + lengths[p]):
            out[i, indices[j]] = data[j]


@numba.njit(nogil=True, cache=True)
def _gather(positions, starts, lengths, data, indices, out_indices, out_data):
    """Copy the fetched rows ``positions`` into one CSR batch (values and gene indices)."""
    k = 0
    for i in range(len(positions)):
        p = positions[i]
        for j in range(starts[p], starts[p] + lengths[p]):
            out_indices[k] = indices[j]
            out_data[k] = data[j]
            k += 1


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
    prefetch: bool = True
    epoch: int = 0
    _arrays: dict | None = field(default=None, repr=False)

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
        """Open the store's arrays and load the per-cell vectors once (8 bytes + a few per cell), in this process."""
        path = Path(self.path)
        self._arrays = {name: ChunkedArray(path / name, name=name) for name in ("X/data", "X/indices")}
        n = int(self.rows.max()) + 1 if len(self.rows) else 0
        self._indptr = ChunkedArray(path / "X/indptr", name="X/indptr").read(0, n + 1)
        self._library = ChunkedArray(path / "obs/library_size", name="obs/library_size").read(0, n).astype(np.float32)
        self._labels = {key: ChunkedArray(path / f"labels/{key}", name=f"labels/{key}").read(0, n).astype(np.int64)
                        for key in self.label_keys}  # fmt: skip
        self._n_vars = int(ChunkedArray(path / "var/names", name="var/names").length)

    def _read(self, rows: np.ndarray):
        """Counts of sorted unique ``rows``: one read per span of nearby rows (gaps up to MAX_GAP read through).

        Returns ``(starts, lengths, data, indices)``: row ``rows[i]`` is ``data[starts[i]:starts[i] + lengths[i]]``.
        """
        indptr = self._indptr
        spans = np.split(rows, np.flatnonzero(np.diff(rows) > MAX_GAP) + 1)
        bounds = [(int(indptr[span[0]]), int(indptr[span[-1] + 1])) for span in spans]
        total = sum(hi - lo for lo, hi in bounds)
        data, indices = np.empty(total, dtype=np.float32), np.empty(total, dtype=np.int32)
        read_spans([(self._arrays["X/data"], bounds, data), (self._arrays["X/indices"], bounds, indices)],
                   parallel=self.prefetch)  # fmt: skip
        span_offset = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in bounds])[:-1]])
        span_lo = np.array([lo for lo, _ in bounds], dtype=np.int64)
        which = np.repeat(np.arange(len(spans)), [len(span) for span in spans])
        starts = indptr[rows] - span_lo[which] + span_offset[which]
        return starts, indptr[rows + 1] - indptr[rows], data, indices

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None  # an open store is never pickled into a worker
        for cached in ("_indptr", "_library", "_labels", "_n_vars"):
            state.pop(cached, None)
        return state

    def _batch(self, batch: np.ndarray, rows: np.ndarray, fetched) -> dict:
        starts, lengths, data, indices = fetched
        positions = np.searchsorted(rows, batch)
        if self.dense:
            # numpy, not torch.zeros: torch's fill runs on its OpenMP threads, whose spinning took
            # half the CPU from the reading threads (measured: 2x slower on 2 cores)
            dense = np.empty((len(batch), self._n_vars), dtype=np.float32)
            _densify(positions, starts, lengths, data, indices, dense)
            X = torch.from_numpy(dense)
        else:
            counts = lengths[positions]
            crow = np.zeros(len(batch) + 1, dtype=np.int64)
            np.cumsum(counts, out=crow[1:])
            cols, values = np.empty(crow[-1], dtype=np.int32), np.empty(crow[-1], dtype=np.float32)
            _gather(positions, starts, lengths, data, indices, cols, values)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's notes on its beta sparse CSR support
                X = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols.astype(np.int64)),
                                            torch.from_numpy(values), size=(len(batch), self._n_vars),
                                            check_invariants=False)  # fmt: skip
        return {
            "X": X,
            "labels": {key: torch.from_numpy(codes[batch]) for key, codes in self._labels.items()},
            "library_size": torch.from_numpy(self._library[batch]),
            "index": torch.from_numpy(batch.astype(np.int64)),
        }

    def __iter__(self) -> Iterator[dict]:
        if self._arrays is None:
            self._open()  # here: in each worker, after fork or spawn
        yield from self._batches()

    def _batches(self) -> Iterator[dict]:
        """Batches of this shard, resumed after ``start_batch``; the next fetch is read while this one is cut."""
        skip, fetches = self.start_batch, []
        for rows, batches in self.plan(*self._shard()):
            if skip < len(batches):
                fetches.append((rows, batches[skip:]))
            skip = max(0, skip - len(batches))
        reads = map(self._read, (rows for rows, _ in fetches))
        if self.prefetch:
            reads = background(reads, depth=1, name="cellmint-read")
        for (rows, batches), fetched in zip(fetches, reads, strict=True):
            for batch in batches:
                yield self._batch(batch, rows, fetched)


@dataclass
class MemoryBatches(StoreBatches):
    """The same batches from an in-memory CSR matrix (training from an AnnData): planning shared, reads are slices.

    ``matrix`` (cells × panel genes, CSR), ``library`` (per cell) and ``codes`` (label codes per key)
    cover every cell; ``rows`` selects the cells streamed.
    """

    matrix: sp.csr_matrix | None = None
    library: np.ndarray | None = None
    codes: dict[str, np.ndarray] | None = None

    def _open(self) -> None:
        self._arrays = {}
        self._indptr = self.matrix.indptr.astype(np.int64, copy=False)
        self._data = self.matrix.data.astype(np.float32, copy=False)
        self._index = self.matrix.indices.astype(np.int32, copy=False)
        self._library = np.asarray(self.library, dtype=np.float32)
        self._labels = {key: np.asarray(self.codes[key], dtype=np.int64) for key in self.label_keys}
        self._n_vars = int(self.matrix.shape[1])

    def _read(self, rows: np.ndarray):
        return self._indptr[rows], self._indptr[rows + 1] - self._indptr[rows], self._data, self._index


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
