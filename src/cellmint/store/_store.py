"""``cm.Store``: a store built by :func:`cellmint.pp.build_store` — reading, appending, splits, integrity."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .._utils import _logging as logg
from .._utils._lock import writer_lock
from . import _split
from ._arrays import ChunkedArray
from ._format import (
    LOCK,
    ROW_CHUNK,
    array_kind,
    numeric_codec,
    read_manifest,
    require_writable,
    values_checksum,
    write_manifest,
)
from ._writer import sync_created


class Store:
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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._arrays: dict[str, ChunkedArray] = {}

    def _array(self, name: str) -> ChunkedArray:
        if name not in self._arrays:
            self._arrays[name] = ChunkedArray(self.path / name, name=name, dtype=array_kind(name, self.manifest).dtype)
        return self._arrays[name]

    def reload(self) -> Store:
        """Read the manifest again: see the cells, inputs and splits other handles or processes committed since."""
        self.manifest = read_manifest(self.path)
        self._arrays = {}
        return self

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's writer lock, with this handle's manifest brought up to date first.

        A handle that another writer overtook reloads here (with a note in the log), so what it then
        writes builds on the newest commit; the commit itself is a compare-and-swap on the manifest.
        """
        with writer_lock(self.path / LOCK, what=f"the store at {self.path}"):
            current = read_manifest(self.path)
            if current.get("generation") != self.manifest.get("generation"):
                logg.info(f"    {self.path} changed since this Store read it (generation "
                          f"{self.manifest.get('generation')} → {current.get('generation')}): reloaded")  # fmt: skip
                self.manifest, self._arrays = current, {}
            require_writable(current, self.path)
            yield

    def _column(self, name: str) -> np.ndarray:
        """The committed values of a per-cell array."""
        return self._array(name).read(0, self.n_obs)

    # -- shape and annotations ---------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Committed cells."""
        return int(self.manifest["n_obs"])

    @property
    def n_vars(self) -> int:
        """Genes of the panel."""
        return int(self.manifest["n_vars"])

    @property
    def nnz(self) -> int:
        """Stored (non-zero) counts."""
        return int(self.manifest["nnz"])

    @property
    def complete(self) -> bool:
        """Whether the build finished (an interrupted build is resumed by calling ``build_store`` again)."""
        return self.manifest["state"] == "complete"

    @property
    def var_names(self) -> pd.Index:
        """The gene panel, in column order."""
        return pd.Index(self.manifest["genes"])

    @property
    def label_keys(self) -> list[str]:
        """Label keys (levels) stored with the cells."""
        return list(self.manifest["label_keys"])

    @property
    def labels(self) -> dict[str, pd.Categorical]:
        """Labels of every cell, one categorical per label key."""
        return {key: self._categorical(f"labels/{key}", self.manifest["labels"][key]) for key in self.label_keys}

    @property
    def groups(self) -> pd.Categorical | None:
        """Group of every cell (e.g. donor), or ``None`` when the store has no ``group_key``."""
        if self.manifest["group_key"] is None:
            return None
        return self._categorical("groups", self.manifest["groups"])

    def _categorical(self, name: str, categories: list) -> pd.Categorical:
        return pd.Categorical.from_codes(self._column(name), categories=categories)

    def obs(self) -> pd.DataFrame:
        """Per-cell table: library size and detected genes (all genes of the input), input, labels, group, obs keys."""
        inputs = self._column("obs/input")
        df = pd.DataFrame(
            {
                "library_size": self._column("obs/library_size"),
                "n_genes": self._column("obs/n_genes"),
                "input": pd.Categorical.from_codes(inputs, categories=[i["name"] for i in self.manifest["inputs"]]),
            },
            index=pd.Index(self._column("obs/names").astype(object)),
        )
        if not df.index.is_unique:  # the same cell names in several inputs: suffix the input's index
            df.index = df.index.astype(str) + "-" + inputs.astype(str).astype(object)
        for key, values in self.labels.items():
            df[key] = values
        if (groups := self.groups) is not None:
            df[self.manifest["group_key"]] = groups
        for key in self.manifest["obs_keys"]:
            values = self._column(f"obs_table/{key}")
            categories = self.manifest["obs_table"].get(key)
            df[key] = pd.Categorical.from_codes(values, categories=categories) if categories is not None else values
        return df

    # -- counts ------------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start:stop`` (a contiguous read), as CSR over the gene panel."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"Rows {start}:{stop} are outside the store's {self.n_obs} cells.")
        indptr = self._array("X/indptr").read(start, stop + 1)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = self._array("X/data").read(lo, hi)
        indices = self._array("X/indices").read(lo, hi)
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_vars))

    def to_adata(self, split: str | None = None, subset: str = "train") -> ad.AnnData:
        """The store (or one part of a split) as an in-memory AnnData: counts in ``X``, ``obs`` as :meth:`obs`.

        Parameters
        ----------
        split
            Name of a split made with :meth:`make_split`; ``None`` returns every cell.
        subset
            Which part of the split: ``"train"``, ``"val"`` or ``"test"``.

        Returns
        -------
        AnnData with the split's cells in store order; ``obs["split"]`` names their part when ``split`` is given.
        """
        if subset not in _split.SPLIT_NAMES:
            raise ValueError(f"subset must be one of {_split.SPLIT_NAMES}, not {subset!r}.")
        if split is not None and split not in self.splits:
            raise KeyError(f"No split {split!r} in this store; splits: {self.splits}. Make one with make_split().")
        X = self.read_rows(0, self.n_obs)
        adata = ad.AnnData(X=X, obs=self.obs(), var=pd.DataFrame(index=self.var_names))
        if split is None:
            return adata
        codes = self.split_codes(split)
        adata.obs["split"] = pd.Categorical.from_codes(codes, categories=list(_split.SPLIT_NAMES))
        return adata[codes == _split.SPLIT_NAMES.index(subset)].copy()

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

        with self._writing():
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

        with self._writing():
            rollback(self)
        return self.reload()

    # -- splits ------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        """Names of the persisted splits."""
        return list(self.manifest.get("splits", {}))

    def split_codes(self, name: str) -> np.ndarray:
        """Part of every cell in split ``name``: 0 train, 1 val, 2 test; -1 for cells appended afterwards."""
        if name not in self.splits:
            raise KeyError(f"No split {name!r} in this store; splits: {self.splits}. Make one with make_split().")
        info = self.manifest["splits"][name]
        stored = self._array(info.get("array", f"splits/{name}")).read(0, info["n_obs"])
        return np.concatenate([stored, np.full(self.n_obs - len(stored), -1, dtype=np.int8)])

    def split_rows(self, name: str, subset: str = "train") -> np.ndarray:
        """Store rows (sorted) of one part of a split."""
        if subset not in _split.SPLIT_NAMES:
            raise ValueError(f"subset must be one of {_split.SPLIT_NAMES}, not {subset!r}.")
        return np.flatnonzero(self.split_codes(name) == _split.SPLIT_NAMES.index(subset))

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
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"A split's name must be a non-empty string without '/', not {name!r}.")
        with self._writing():
            if not self.complete:
                raise ValueError(f"The store at {self.path} is unfinished ({self.n_obs:,} cells committed): a split "
                                 "now would leave out the cells still to come. Resume the build (cm.pp.build_store "
                                 "with the same arguments) or the append (Store.append again, or Store.rollback()) "
                                 "first.")  # fmt: skip
            if name in self.splits and not overwrite:
                raise ValueError(f"A split named {name!r} exists; pass overwrite=True to replace it.")
            return self._make_split(name, test_fraction=test_fraction, val_fraction=val_fraction,
                                    group_key=group_key, stratify_labels=stratify_labels, label_key=label_key,
                                    random_state=random_state)  # fmt: skip

    def _make_split(self, name: str, *, test_fraction, val_fraction, group_key, stratify_labels, label_key,
                    random_state) -> pd.DataFrame:  # fmt: skip
        obs = self.obs()
        group_key = None if group_key is False else (group_key or self.manifest["group_key"])
        if group_key is not None and group_key not in obs.columns:
            raise KeyError(f"group_key {group_key!r} is neither the store's group nor one of its obs_keys "
                           f"({[self.manifest['group_key'], *self.manifest['obs_keys']]}).")  # fmt: skip
        if label_key is not None and label_key not in self.label_keys:
            raise KeyError(f"label_key {label_key!r} is not a label key of the store ({self.label_keys}).")
        label_key = label_key or (self.label_keys[0] if self.label_keys else None)
        labels = obs[label_key].cat.codes.to_numpy() if (stratify_labels and label_key) else None
        groups = obs[group_key].astype(str).to_numpy() if group_key is not None else None
        codes = _split.assign(
            labels,
            groups,
            n_obs=self.n_obs,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            random_state=random_state,
        ).astype(np.int8)
        if groups is not None and (leaks := _split.leakage(groups, codes)):
            raise AssertionError(f"groups in several parts: {leaks[:5]}")  # pragma: no cover - by construction
        # a new array for every version of a split: the one the manifest names stays intact until the commit
        array = f"splits/{name}-{self.manifest['generation'] + 1}"
        root = zarr.open_group(self.path, mode="r+")
        splits = root.require_group("splits")
        if array.split("/", 1)[1] in splits:
            del splits[array.split("/", 1)[1]]
        splits.create_array(array.split("/", 1)[1], shape=(0,), dtype="int8", chunks=(ROW_CHUNK,),
                            compressors=numeric_codec())  # fmt: skip
        self._arrays.pop(array, None)
        written = self._array(array)
        written.write(0, codes)
        written.set_length(self.n_obs)
        written.sync()
        sync_created(self.path, ["splits/zarr.json", "splits"])  # made by zarr: on disk before the commit names them
        parts = pd.Categorical.from_codes(codes, categories=list(_split.SPLIT_NAMES))
        classes = obs[label_key] if label_key else pd.Series(["all"] * self.n_obs, index=obs.index)
        table = pd.crosstab(pd.Series(classes.to_numpy(), name=label_key or "cells"), pd.Series(parts, name="split"))
        table = table.reindex(columns=list(_split.SPLIT_NAMES), fill_value=0)
        replaced = self.manifest.get("splits", {}).get(name, {}).get("array", f"splits/{name}")
        self.manifest.setdefault("splits", {})[name] = {
            "test_fraction": test_fraction, "val_fraction": val_fraction, "group_key": group_key,
            "label_key": label_key if stratify_labels else None, "random_state": random_state, "n_obs": self.n_obs,
            "cells": {part: int((codes == i).sum()) for i, part in enumerate(_split.SPLIT_NAMES)},
            "array": array, "crc32": values_checksum(codes),
        }  # fmt: skip
        write_manifest(self.path, self.manifest)
        if name in self.splits and replaced != array and (self.path / replaced).is_dir():
            import shutil

            shutil.rmtree(self.path / replaced)  # the replaced version, no longer named by the manifest
        return table

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
        block_size: int = 256,
        fetch_blocks: int = 16,
        rows: np.ndarray | None = None,
        prefetch: bool = True,
    ):
        """Shuffled, optionally label-balanced mini-batches for torch (see :mod:`cellmint.store._sampling`).

        Parameters
        ----------
        batch_size
            Cells per batch.
        split
            ``"train"``, ``"val"`` or ``"test"`` part of the split ``"default"``, or ``"name:part"`` for another
            split; ``None`` streams every cell.
        shuffle
            Block shuffling: blocks of ``block_size`` consecutive cells in random order, ``fetch_blocks`` of
            them read together and shuffled in memory. ``False`` streams cells in store order.
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
            Resume an epoch after this many batches (per worker and rank) without reading them.
        block_size
            Consecutive cells per shuffled block.
        fetch_blocks
            Blocks read and shuffled together.
        rows
            Stream these store rows instead of a split's part (``split`` is then ignored).
        prefetch
            Read the next fetch in background threads while batches are cut from this one. Turn it off
            when the consumer computes on the same CPU cores (CPU training): torch's own threads then
            run without competing with the readers.

        Returns
        -------
        An iterable of batches (a torch DataLoader underneath; ``set_epoch(e)`` selects the epoch's order):
        dicts with ``"X"`` (cells × genes counts), ``"labels"`` (``{key: int64 codes}``), ``"library_size"``
        (float32, over all genes of the input) and ``"index"`` (store rows). Under ``torch.distributed``
        every rank reads its own share.
        """
        from ._sampling import BALANCE_EXPONENT, StoreBatches, StoreLoader

        if balance not in BALANCE_EXPONENT:
            raise ValueError(f"balance must be None, 'sqrt' or 'inverse', not {balance!r}.")
        for arg, value, minimum in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                                    ("fetch_blocks", fetch_blocks, 1), ("start_batch", start_batch, 0),
                                    ("num_workers", num_workers, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(f"{arg} must be an integer ≥ {minimum}, not {value!r}.")
        if worker_start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"worker_start_method must be None, 'fork', 'spawn' or 'forkserver', "
                             f"not {worker_start_method!r}.")  # fmt: skip
        if label_key is not None and label_key not in self.label_keys:
            raise KeyError(f"label_key {label_key!r} is not a label key of the store ({self.label_keys}).")
        if rows is not None:
            rows = np.unique(np.asarray(rows, dtype=np.int64))
            if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_obs):
                raise IndexError(f"rows must lie in 0..{self.n_obs - 1}.")
        elif split is None:
            rows = np.arange(self.n_obs)
        else:
            name, _, part = split.rpartition(":")
            rows = self.split_rows(name or _split.DEFAULT_SPLIT, part)
        if len(rows) == 0:
            raise ValueError(f"The {split!r} part of the store has no cells.")
        codes = None
        if balance is not None:
            label_key = label_key or (self.label_keys[0] if self.label_keys else None)
            if label_key is None:
                raise ValueError("balance needs a label key, and this store has none.")
            codes = self._column(f"labels/{label_key}")[rows]
        dataset = StoreBatches(
            self.path, rows, self.label_keys, batch_size=batch_size, shuffle=shuffle, balance_codes=codes,
            balance_exponent=BALANCE_EXPONENT[balance], random_state=random_state, drop_last=drop_last, dense=dense,
            block_size=block_size, fetch_blocks=fetch_blocks, start_batch=start_batch, prefetch=prefetch,
        )  # fmt: skip
        cuda = device is not None and str(device).startswith("cuda")
        import torch

        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=cuda,
            multiprocessing_context=worker_start_method if num_workers > 0 else None,
        )  # fmt: skip
        return StoreLoader(loader, torch.device(device) if device is not None else None)

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

    def summary(self) -> dict:
        """Cells, genes, stored counts, inputs, and the class balance per label key and per group."""
        out = {
            "cells": self.n_obs, "genes": self.n_vars, "nnz": self.nnz, "complete": self.complete,
            "inputs": {i["name"]: i["n_obs"] for i in self.manifest["inputs"]},
            "labels": {key: pd.Series(values).value_counts().to_dict() for key, values in self.labels.items()},
        }  # fmt: skip
        if (groups := self.groups) is not None:
            out["groups"] = pd.Series(groups).value_counts().to_dict()
        out["splits"] = {name: dict(info["cells"]) for name, info in self.manifest.get("splits", {}).items()}
        return out

    def __repr__(self) -> str:
        state = "" if self.complete else ", build interrupted"
        labels = f", labels {self.label_keys}" if self.label_keys else ""
        return f"Store({str(self.path)!r}: {self.n_obs:,} cells × {self.n_vars:,} genes{labels}{state})"
