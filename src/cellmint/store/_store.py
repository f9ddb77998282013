"""``cm.Store``: a store built by :func:`cellmint.pp.build_store` — reading, appending, splits, integrity.

The façade over the store's modules: reading in ``_reader`` (the base class), appending in
``_append``, splits in ``_split``, every commit in ``_writer``, the loader in ``_sampling`` and the
checks in ``_verify``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import _split
from ._reader import StoreReader
from ._writer import writing

if TYPE_CHECKING:
    from ._sampling import StoreLoader


class Store(StoreReader):
    """A cellmint training store: sparse counts, labels, groups and per-cell statistics on disk.

    Parameters
    ----------
    path
        Folder of a store built by :func:`cellmint.pp.build_store`.

    Examples
    --------
    >>> store = cm.pp.build_store(cm.datasets.cellbench(), "cellbench.zarr", label_keys=["cell_line"])
    >>> store.n_obs, store.n_vars
    (510, 17835)
    """

    # -- writing ---------------------------------------------------------------------------
    def append(self, data, *, missing_genes: str | None = None, allow_duplicates: bool = False,
               progress: bool | None = None) -> Store:  # fmt: skip
        """Add the cells of more inputs to a finished store, batch by batch and crash-safe like a build.

        Parameters
        ----------
        data
            AnnData or path, or a list of them, with the store's label, group and obs columns. Genes are
            matched to the store's panel by name.
        missing_genes
            Panel genes an input lacks: ``"error"`` refuses the input and lists them, ``"zero"`` stores zero
            counts (recorded per input in the manifest); ``None`` follows the store's build.
        allow_duplicates
            Store an input that is already in the store, and cells whose names already occur in the store
            or twice in the inputs. By default these are refused.
        progress
            Progress bar per input.

        Returns
        -------
        This store, extended. Existing splits keep their cells; appended cells belong to no part
        (code -1) until a split is made again.

        Notes
        -----
        If the append fails (a bad value in an input, a crash), the batches committed so far stay and
        the store is marked unfinished: call ``append`` again with the same inputs to resume, or with an
        input fixed after its committed rows, or call :meth:`rollback` to return to the store as it was
        before the append. Only one process writes a store at a time (a second one gets an error).
        """
        from ._append import append

        with writing(self):
            append(self, data, missing_genes=missing_genes, allow_duplicates=allow_duplicates, progress=progress)
        return self.reload()

    def rollback(self) -> Store:
        """Undo an unfinished append: the store returns to its state before it, complete and verifiable.

        The cells, inputs and categories the failed or interrupted append committed are dropped. An
        unfinished *build* has no earlier state: resume it with :func:`cellmint.pp.build_store` (same
        arguments) or rebuild it with ``overwrite=True``.

        Returns
        -------
        This store, rolled back.
        """
        from ._append import rollback

        with writing(self):
            rollback(self)
        return self.reload()

    # -- splits ------------------------------------------------------------------------------
    def make_split(
        self,
        name: str = _split.DEFAULT_SPLIT,
        *,
        test_fraction: float = 0.1,
        val_fraction: float = 0.0,
        group_key: str | bool | None = None,
        stratify_labels: bool = True,
        label_key: str | None = None,
        random_state: int = 0,
        overwrite: bool = False,
    ) -> pd.DataFrame:
        """Split the cells into train/val/test, keeping groups whole and label proportions close, and persist it.

        Parameters
        ----------
        name
            Name of the split (a store holds several).
        test_fraction
            Target fraction of cells in the test part.
        val_fraction
            Target fraction of cells in the validation part.
        group_key
            Keep the cells of each value of this column together: the store's group column or one of its
            ``obs_keys``. ``None`` uses the store's groups when it has them; ``False`` splits single cells.
        stratify_labels
            Match the label proportions of the parts (exactly without groups, as closely as groups allow).
        label_key
            Label key to stratify by (default: the first).
        random_state
            Seed of the assignment.
        overwrite
            Replace an existing split of that name.

        Returns
        -------
        Cells per part and label class (rows: classes; columns: train, val, test), as recorded.
        """
        _split.check_fractions(test_fraction, val_fraction)
        _split.check_name(name)
        with writing(self):
            return _split.make(self, name, test_fraction=test_fraction, val_fraction=val_fraction, group_key=group_key,
                               stratify_labels=stratify_labels, label_key=label_key, random_state=random_state,
                               overwrite=overwrite)  # fmt: skip

    # -- streaming ---------------------------------------------------------------------------
    def loader(
        self,
        batch_size: int = 256,
        split: str | None = "train",
        *,
        shuffle: bool = True,
        balance: str | None = None,
        label_key: str | None = None,
        random_state: int = 0,
        num_workers: int = 0,
        worker_start_method: str | None = None,
        drop_last: bool = False,
        dense: bool = True,
        device: str | None = None,
        start_batch: int = 0,
        block_size: int | None = None,
        fetch_blocks: int = 16,
        rows: np.ndarray | None = None,
        prefetch: bool = True,
        distributed: str = "shard",
    ) -> StoreLoader:
        """Shuffled, optionally label-balanced mini-batches for torch (see :mod:`cellmint.store._sampling`).

        Parameters
        ----------
        batch_size
            Cells per batch.
        split
            ``"train"``, ``"val"`` or ``"test"`` part of the split ``"default"``, or ``"name:part"`` for another
            split; ``None`` streams every cell.
        shuffle
            Block shuffling: blocks of consecutive cells in random order, read about ``fetch_blocks`` blocks
            at a time (whole chunk files, one read per file) and shuffled in memory. ``False`` streams cells
            in store order. Each cell is visited once per epoch (without ``balance``).
        balance
            ``None``; ``"sqrt"`` or ``"inverse"``: cells are drawn with weights ``n_c^-0.5`` or ``n_c^-1`` of
            their class (``label_key``), about as many cells per epoch as the split holds, none discarded
            for good (each epoch draws again).
        label_key
            Label key used for balancing (default: the first).
        random_state
            Seed; with :meth:`~StoreBatches.set_epoch` it fixes the order of every epoch.
        num_workers
            torch DataLoader workers; each reads its own share of blocks.
        worker_start_method
            ``"fork"``, ``"spawn"`` or ``"forkserver"`` for the workers (default: torch's).
        drop_last
            Drop a last, smaller batch.
        dense
            Yield dense ``float32`` counts (else torch sparse CSR).
        device
            Move batches to this device (pinned memory for CUDA).
        start_batch
            Resume an epoch after this many batches (per worker and rank; with ``distributed="global"``,
            global steps) without reading them.
        block_size
            Consecutive cells per shuffled block. ``None``: the cells whose counts start in the same two chunk
            files of counts (about 600 cells at 440 stored counts per cell; 130 at 2,000), so that every file
            is read once per epoch.
        fetch_blocks
            Blocks read and shuffled together.
        rows
            Stream these store rows instead of a split's part (``split`` is then ignored).
        prefetch
            Read the next fetch in background threads while batches are cut from this one. Turn it off
            when the consumer computes on the same CPU cores (CPU training): torch's own threads then
            run without competing with the readers.
        distributed
            How the ranks of ``torch.distributed`` share an epoch (:mod:`cellmint.store._sampling`):
            ``"shard"`` (blocks dealt to ranks, each cutting its own batches), ``"global"`` (every rank
            takes its part of the same global batches of ``batch_size`` cells, in an order that does not
            depend on the number of ranks — data-parallel training, resumable with any number of ranks)
            or ``"none"`` (every rank streams all the rows).

        Returns
        -------
        An iterable of batches (a torch DataLoader underneath; ``set_epoch(e)`` selects the epoch's order):
        dicts with ``"X"`` (cells × genes counts), ``"labels"`` (``{key: int64 codes}``), ``"library_size"``
        (float32, over all genes of the input) and ``"index"`` (store rows); with ``distributed="global"``
        also ``"global_index"`` (the rows of the whole global batch). Under ``torch.distributed`` every
        rank reads its own share.
        """
        from ._loader import store_loader

        return store_loader(
            self, batch_size, split, shuffle=shuffle, balance=balance, label_key=label_key, random_state=random_state,
            num_workers=num_workers, worker_start_method=worker_start_method, drop_last=drop_last, dense=dense,
            device=device, start_batch=start_batch, block_size=block_size, fetch_blocks=fetch_blocks, rows=rows,
            prefetch=prefetch, distributed=distributed,
        )  # fmt: skip

    # -- integrity ---------------------------------------------------------------------------
    def verify(self) -> dict:
        """Check every array of the store against the checksums its manifest commits.

        Counts (CSR invariants, gene indices, crc32 per batch), every per-cell array (names, library size,
        detected genes, input, labels, groups, obs columns: crc32 per batch), the gene panel against
        ``var/names``, every split (crc32, groups kept whole) and the arrays' lengths. The manifest's own
        checksum was checked when the store was opened; each chunk file's crc32c is checked as it is read.

        Returns
        -------
        A summary (``{"batches": ..., "cells": ..., "nnz": ...}``) when everything holds.

        Raises
        ------
        ValueError
            Listing every problem found, each naming the array and the rows (batch and input) affected.
        """
        from ._verify import verify

        return verify(self)
