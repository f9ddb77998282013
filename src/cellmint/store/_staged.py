"""Mini-batches from counts staged once in device memory: planned like every loader, gathered on the device.

Streaming reads each epoch's cells again from the store (or host memory) and densifies them on the
host; on a GPU that host work, not the network, sets the speed. When the training cells' counts fit
(:func:`fits_device`), they are copied to the device once, as CSR (values float32, gene indices
int32, 8 bytes per stored value: 10 million cells × 1,000 values ≈ 80 GB, an H200's memory), and
every batch is a row gather and a scatter into a dense block there, with no host work but the plan.

The plan is :class:`~cellmint.store._sampling.StoreBatches`' (seeded, balanced, resumable, the
same ``distributed="global"`` share of each global batch per rank), with one difference: on the
device any order costs the same, so the cells are shuffled over the whole epoch, not in windows of
blocks (``block_size`` = the batch, one window). Each epoch visits every planned cell once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .._utils._device import dense_rows
from ._sampling import MemoryBatches, StoreBatches, _batch_dict, _gather

#: the share of the device's free memory the staged counts may take (the rest: the network, its batches)
STAGE_FRACTION = 0.5
#: bytes per stored value on the device (float32 value, int32 gene index)
BYTES_PER_VALUE = 8
#: cells read from a store per slice while staging
READ_CELLS = 1 << 16


def staged_bytes(n_values: int, n_cells: int) -> int:
    """Device memory the staged counts of ``n_cells`` cells with ``n_values`` stored values take."""
    return BYTES_PER_VALUE * int(n_values) + 8 * (int(n_cells) + 1) + 12 * int(n_cells)


def fits_device(n_values: int, n_cells: int, device: torch.device) -> bool:
    """Whether the counts fit in :data:`STAGE_FRACTION` of the device's free memory (GPUs only; never on a CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return staged_bytes(n_values, n_cells) <= STAGE_FRACTION * free


def store_counts(dataset: StoreBatches, rows: np.ndarray) -> sp.csr_matrix:
    """The counts of ``rows`` of a store as a CSR matrix over cells ``0..max(rows)`` (the other rows empty).

    Read in slices of :data:`READ_CELLS` cells through the loader's own reads (checksums checked).
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    dataset._open()
    n = int(rows[-1]) + 1 if len(rows) else 0
    lengths = np.zeros(n, dtype=np.int64)
    data, indices = [], []
    for start in range(0, len(rows), READ_CELLS):
        part = rows[start : start + READ_CELLS]
        starts, counts, values, genes = dataset._read(part)
        out_data, out_indices = np.empty(counts.sum(), np.float32), np.empty(counts.sum(), np.int32)
        _gather(np.arange(len(part)), starts, counts, values, genes, out_indices, out_data)
        lengths[part] = counts
        data.append(out_data)
        indices.append(out_indices)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    values = np.concatenate(data) if data else np.zeros(0, np.float32)
    genes = np.concatenate(indices) if indices else np.zeros(0, np.int32)
    return sp.csr_matrix((values, genes, indptr), shape=(n, dataset._n_vars))


@dataclass
class StagedBatches(MemoryBatches):
    """:class:`~cellmint.store._sampling.MemoryBatches` whose counts live on ``device``; batches densified there.

    ``X``, ``library_size`` and ``labels`` of each batch are on the device; ``index`` and
    ``global_index`` stay on the host (the plan's rows).
    """

    device: torch.device | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prefetch = False  # nothing to read ahead: the counts are on the device
        self.block_size = self.batch_size
        self.fetch_blocks = 1 << 30  # one window: the whole epoch shuffled (module docstring)

    def _open(self) -> None:
        super()._open()
        device = self.device or torch.device("cpu")
        self._device_data = torch.as_tensor(self._data).to(device)
        self._device_index = torch.as_tensor(self._index).to(device)
        self._device_library = torch.as_tensor(self._library).to(device)
        self._device_labels = {key: torch.as_tensor(codes).to(device) for key, codes in self._labels.items()}

    def _read(self, rows: np.ndarray):
        return None  # every cell is on the device

    def _batch(self, batch: np.ndarray, rows: np.ndarray, fetched, whole: np.ndarray | None = None) -> dict:
        device = self._device_data.device
        starts = self._indptr[batch]
        lengths = self._indptr[batch + 1] - starts
        total = int(lengths.sum())  # from the host's indptr: no device sync
        # each stored value's position: its row's start, plus its place in the row
        offsets = np.zeros(len(batch), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        shift = torch.as_tensor(starts - offsets).to(device, non_blocking=True)
        counts = torch.as_tensor(lengths).to(device, non_blocking=True)
        where = torch.repeat_interleave(shift, counts, output_size=total) + torch.arange(total, device=device)
        X = dense_rows(counts, self._device_index[where], self._device_data[where], self._n_vars, total)
        picked = torch.as_tensor(batch).to(device, non_blocking=True)
        labels = {key: codes[picked] for key, codes in self._device_labels.items()}
        return _batch_dict(X, labels, self._device_library[picked], batch, whole)
