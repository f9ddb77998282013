"""``Store.loader``: the arguments checked, the rows and blocks planned, the DataLoader made.

The batches themselves (planning, block shuffling, balancing, ranks) are :mod:`cellmint.store._sampling`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ._sampling import StoreBatches, StoreLoader, check_balance, chunk_blocks
from ._split import DEFAULT_SPLIT

if TYPE_CHECKING:
    from ._reader import StoreReader


def store_loader(store: StoreReader, batch_size: int, split: str | None, *, shuffle: bool, balance: str | None,
                 label_key: str | None, random_state: int, num_workers: int, worker_start_method: str | None,
                 drop_last: bool, dense: bool, device: str | None, start_batch: int, block_size: int | None,
                 fetch_blocks: int, rows: np.ndarray | None, prefetch: bool,
                 distributed: str) -> StoreLoader:  # fmt: skip
    """See :meth:`cellmint.Store.loader`: the arguments checked, the rows and blocks planned, the DataLoader made."""
    exponent = check_balance(balance)
    block = 1 if block_size is None else block_size
    for arg, value, minimum in (("batch_size", batch_size, 1), ("block_size", block, 1),
                                ("fetch_blocks", fetch_blocks, 1), ("start_batch", start_batch, 0),
                                ("num_workers", num_workers, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{arg} must be an integer ≥ {minimum}, not {value!r}.")
    if worker_start_method not in (None, "fork", "spawn", "forkserver"):
        raise ValueError(f"worker_start_method must be None, 'fork', 'spawn' or 'forkserver', "
                         f"not {worker_start_method!r}.")  # fmt: skip
    if label_key is not None and label_key not in store.label_keys:
        raise KeyError(f"label_key {label_key!r} is not a label key of the store ({store.label_keys}).")
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= store.n_obs):
            raise IndexError(f"rows must lie in 0..{store.n_obs - 1}.")
    elif split is None:
        rows = np.arange(store.n_obs)
    else:
        name, _, part = split.rpartition(":")
        rows = store.split_rows(name or DEFAULT_SPLIT, part)
    if len(rows) == 0:
        raise ValueError(f"The {split!r} part of the store has no cells.")
    codes = None
    if balance is not None:
        label_key = label_key or (store.label_keys[0] if store.label_keys else None)
        if label_key is None:
            raise ValueError("balance needs a label key, and this store has none.")
        codes = store._column(f"labels/{label_key}")[rows]
    blocks = None
    if block_size is None:  # blocks laid along the chunk files of counts
        starts = store._array("X/indptr").read(0, int(rows[-1]) + 1)[rows]
        blocks = chunk_blocks(starts, store._array("X/data").chunk)
    dataset = StoreBatches(
        store.path, rows, store.label_keys, batch_size=batch_size, shuffle=shuffle, balance_codes=codes,
        balance_exponent=exponent, random_state=random_state, drop_last=drop_last, dense=dense,
        block_size=block_size, fetch_blocks=fetch_blocks, start_batch=start_batch, prefetch=prefetch,
        block_ids=blocks, distributed=distributed,
    )  # fmt: skip
    return data_loader(dataset, num_workers=num_workers, worker_start_method=worker_start_method, device=device)


def data_loader(dataset: StoreBatches, *, num_workers: int = 0, worker_start_method: str | None = None,
                device: str | None = None) -> StoreLoader:  # fmt: skip
    """The torch DataLoader over planned batches (of a store, or of cells in memory), as a :class:`StoreLoader`.

    The dataset yields whole batches (``batch_size=None``); batches bound for a GPU come from pinned memory.
    """
    cuda = device is not None and str(device).startswith("cuda")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=cuda,
        multiprocessing_context=worker_start_method if num_workers > 0 else None,
    )  # fmt: skip
    return StoreLoader(loader, torch.device(device) if device is not None else None)
