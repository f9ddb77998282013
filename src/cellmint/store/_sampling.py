"""Mini-batches from a store for torch: block shuffling, label balancing, workers and ranks.

An epoch is planned from indices alone, before any read: the split's rows (repeated or left out by
label-balancing weights when asked), cut into blocks of consecutive rows, blocks shuffled, blocks
dealt to shards (DataLoader workers × distributed ranks), then laid end to end and cut into windows
of about ``fetch_blocks`` blocks, each read at once (contiguous reads), shuffled in memory and cut
into batches. A store's blocks follow its chunk files of counts (the cells whose counts start in
``BLOCK_CHUNKS`` files), so that a shuffled epoch decodes each file about once, as a sequential one
does, instead of decoding partly used files again for every block that touches them. Planning first
makes epochs reproducible from ``(random_state, epoch)`` and lets a run resume mid-epoch without
reading the batches it skips. Each worker opens the store itself, so fork and spawn both work.

Under ``torch.distributed`` ranks share an epoch in one of two ways (``distributed=``):

- ``"shard"``: blocks are dealt to ranks, and each rank cuts its own batches (a
  ``DistributedSampler``'s habit). The order of the epoch depends on the number of ranks.
- ``"global"`` (data-parallel training): every rank plans the same *global* batches of
  ``batch_size`` cells — exactly the batches of a single process — and takes from each the cells of
  the blocks it owns (block ``i`` of the epoch belongs to rank ``i % world``), so each rank reads only
  its own blocks. A step is the same set of cells whatever the number of ranks, and ``start_batch``
  counts global steps: a run resumes at the same cell with more or fewer ranks. The ranks' shares of
  one step differ by a few cells (block ownership, not a cut into equal parts); each batch carries the
  rows of the whole global batch (``"global_index"``) so that the loss can be the exact mean over it.
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


def check_balance(balance: str | None) -> float:
    """The sampling exponent of ``balance=`` (``None``, ``"sqrt"``, ``"inverse"``), or a ValueError."""
    if balance not in BALANCE_EXPONENT:
        raise ValueError(f"balance must be None, 'sqrt' or 'inverse', not {balance!r}.")
    return BALANCE_EXPONENT[balance]


#: how ranks of torch.distributed share an epoch (module docstring)
DISTRIBUTED = ("shard", "global", "none")
#: rows between two wanted rows that are read through rather than starting a new read
MAX_GAP = 64
#: cells per block where blocks are not laid along chunk files (an in-memory matrix, or ``block_size`` not given
#: for one)
DEFAULT_BLOCK_SIZE = 256
#: chunk files of counts per block of a store: a block is the cells whose counts start in these files, so a
#: window reads whole files, plus at most the head of the next one per block (where its last cell's counts
#: end). A shuffled epoch of a 200,000 × 2,000 store (440 counts per cell) decoded 1.46 times the files a
#: sequential one decodes, against 2.1 with blocks of 256 cells and 3.4 (batch 256) to 10.5 (batch 4,096)
#: before windows were cut from the blocks laid end to end. More files per block waste fewer decodes but
#: make larger windows (slower: the gathers leave the cache) or fewer blocks per window (coarser shuffling)
BLOCK_CHUNKS = 2


def chunk_blocks(starts: np.ndarray, chunk: int, chunks_per_block: int = BLOCK_CHUNKS) -> np.ndarray:
    """Block of each cell whose counts start at ``starts`` (its ``indptr``): its chunk file // ``chunks_per_block``."""
    return np.asarray(starts, dtype=np.int64) // (int(chunk) * int(chunks_per_block))


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
    block_size: int | None = None
    fetch_blocks: int = 16
    block_ids: np.ndarray | None = None  # per row of ``rows``: its block (non-decreasing); else fixed-size blocks
    start_batch: int = 0
    prefetch: bool = True
    epoch: int = 0
    distributed: str = "shard"
    _arrays: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {DISTRIBUTED}, not {self.distributed!r}.")

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        """Use the order of epoch ``epoch`` (call before each epoch, as with DistributedSampler).

        ``start_batch`` also sets the batches to skip (``None`` keeps them).
        """
        self.epoch = int(epoch)
        if start_batch is not None:
            self.start_batch = int(start_batch)

    # -- planning (indices only) ---------------------------------------------------------------
    def _position(self) -> tuple[int, int, int, int]:
        """``(rank, world, worker, workers)`` of this process and DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        if self.distributed != "none" and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank, world, worker, workers

    def _epoch_blocks(self) -> tuple[list[np.ndarray], np.random.Generator]:
        """The epoch's blocks of rows, in their shuffled order, and the generator that cuts them into batches.

        A store's blocks are the runs of rows with the same ``block_ids`` (their chunk files of counts);
        otherwise runs of ``block_size`` rows.
        """
        rng = np.random.default_rng([self.random_state, self.epoch])
        rows, ids = self.rows, self.block_ids
        if self.balance_codes is not None and self.balance_exponent > 0:
            visits = multiplicities(self.balance_codes, self.balance_exponent, rng)
            rows = np.repeat(rows, visits)
            ids = None if ids is None else np.repeat(ids, visits)
        if ids is not None:
            cuts = np.flatnonzero(np.diff(ids)) + 1
        else:
            size = self.block_size or DEFAULT_BLOCK_SIZE
            cuts = np.arange(size, len(rows), size)
        bounds = np.concatenate([[0], cuts, [len(rows)]]).astype(np.int64)
        order = rng.permutation(len(bounds) - 1) if self.shuffle else np.arange(len(bounds) - 1)
        return [rows[bounds[b] : bounds[b + 1]] for b in order], rng

    def _cut(self, blocks: list[np.ndarray], rng: np.random.Generator) -> list[list[np.ndarray]]:
        """Batches of every fetch: the blocks laid end to end, cut into windows, each shuffled and cut.

        A window holds a whole number of batches, about ``fetch_blocks`` blocks; a block may end in one
        window and go on in the next, so no cell is read twice (a remainder carried into the next
        fetch had been read again with it).
        """
        if not blocks:
            return []
        sequence = np.concatenate(blocks)
        window = self.batch_size * max(1, round(self.fetch_blocks * len(sequence) / len(blocks) / self.batch_size))
        fetches = []
        for start in range(0, len(sequence), window):
            pool = sequence[start : start + window]
            if self.shuffle:
                pool = pool[rng.permutation(len(pool))]
            batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            if start + window >= len(sequence) and self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            if batches:
                fetches.append(batches)
        return fetches

    def plan(self, shard: int = 0, n_shards: int = 1) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Fetches of one shard in this epoch: (rows to read, batches as row arrays), in order."""
        blocks, rng = self._epoch_blocks()
        return [(np.unique(np.concatenate(batches)), batches) for batches in self._cut(blocks[shard::n_shards], rng)]

    def plan_global(self, rank: int = 0, world: int = 1) -> list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
        """Fetches of rank ``rank`` of ``world`` (``distributed="global"``, see module docstring).

        Each is ``(rows this rank reads, its part of every global batch, the global batches)``; the
        global batches are those of ``plan()`` in one process, whatever ``world`` is.
        """
        blocks, rng = self._epoch_blocks()
        lengths = [len(block) for block in blocks]
        order = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(blocks)) % world, lengths)
        # cut positions in the epoch rather than rows: the same draws as plan(), and each cell keeps its owner
        positions = np.split(np.arange(len(order)), np.cumsum(lengths)[:-1]) if blocks else []
        fetches = []
        for batches in self._cut(positions, rng):
            mine = [order[b[owner[b] == rank]] for b in batches]
            fetches.append((np.unique(np.concatenate(mine)), mine, [order[b] for b in batches]))
        return fetches

    def __len__(self) -> int:
        if self.distributed == "global":
            return sum(len(whole) for _, _, whole in self.plan_global()) - self.start_batch
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
        if len(rows) == 0:  # a rank without cells in this fetch (distributed="global")
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32)
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

    def _batch(self, batch: np.ndarray, rows: np.ndarray, fetched, whole: np.ndarray | None = None) -> dict:
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
        labels = {key: torch.from_numpy(codes[batch]) for key, codes in self._labels.items()}
        return _batch_dict(X, labels, torch.from_numpy(self._library[batch]), batch, whole)

    def __iter__(self) -> Iterator[dict]:
        if self._arrays is None:
            self._open()  # here: in each worker, after fork or spawn
        yield from self._batches()

    def _batches(self) -> Iterator[dict | list[dict]]:
        """Batches of this shard, resumed after ``start_batch``; the next fetch is read while this one is cut."""
        rank, world, worker, workers = self._position()
        if self.distributed == "global":
            planned = self.plan_global(rank, world)
        else:
            planned = [(rows, batches, [None] * len(batches))
                       for rows, batches in self.plan(rank * workers + worker, world * workers)]  # fmt: skip
        skip, fetches = self.start_batch, []
        for rows, batches, whole in planned:
            if skip < len(batches):
                fetches.append((rows, batches[skip:], whole[skip:]))
            skip = max(0, skip - len(batches))
        grouped = self.distributed == "global" and workers > 1
        if grouped:
            # workers take whole fetches in turn and hand each over as one list: the DataLoader's
            # round-robin over workers then gives the steps in their planned order
            fetches = fetches[worker::workers]
        reads = map(self._read, (rows for rows, _, _ in fetches))
        if self.prefetch:
            reads = background(reads, depth=1, name="cellmint-read")
        for (rows, batches, whole), fetched in zip(fetches, reads, strict=True):
            cut = (self._batch(batch, rows, fetched, w) for batch, w in zip(batches, whole, strict=True))
            if grouped:
                yield list(cut)
            else:
                yield from cut


def _batch_dict(X, labels: dict, library_size, batch: np.ndarray, whole: np.ndarray | None) -> dict:
    """A loader's batch: ``X``, ``labels``, ``library_size``; the cells' ``index`` (``global_index``) on the host."""
    out = {"X": X, "labels": labels, "library_size": library_size, "index": torch.from_numpy(batch.astype(np.int64))}
    if whole is not None:
        out["global_index"] = torch.from_numpy(whole.astype(np.int64))
    return out


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

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        """Use the order of epoch ``epoch``, from batch ``start_batch`` (``None``: as it was)."""
        self.dataset.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        for item in self.loader:
            for batch in item if isinstance(item, list) else (item,):  # a list: one fetch of a worker
                yield batch if self.device is None else _to(batch, self.device)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
