"""Every write to a store: values beyond the committed ones, flushed, then committed in the manifest (``_format``).

Batches of cells go in two stages, so that ingest can overlap them: :meth:`StoreWriter.encode`
(caller's thread) turns a chunk of cells into a :class:`Batch` (codes for labels, groups and obs
columns; categories only grow), and :meth:`StoreWriter.commit` (a writer thread) writes its arrays,
flushes them to disk, then commits it with the checksums of every array. A split is committed the
same way by :func:`commit_split`. Writes are made only under :func:`writing` (the store's lock, the
handle's manifest brought up to date) or by ``build_store``, which holds the lock itself.
"""

from __future__ import annotations

import copy
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from .._utils import _logging as logg
from .._utils._files import fsync_folder
from .._utils._lock import writer_lock
from .._utils._values import checked_labels
from .._version import __version__
from . import _format
from ._arrays import ChunkedArray, run_writes
from ._format import (
    DATA_CHUNK,
    FORMAT_VERSION,
    LOCK,
    ROW_CHUNK,
    array_kind,
    numeric_codec,
    read_manifest,
    require_writable,
    row_arrays,
    string_codec,
    values_checksum,
    write_manifest,
)

if TYPE_CHECKING:
    from ._reader import StoreReader


@contextmanager
def writing(store: StoreReader) -> Iterator[None]:
    """Hold the store's writer lock, with the handle's manifest brought up to date first.

    A handle that another writer overtook reloads here (with a note in the log), so what it then
    writes builds on the newest commit; the commit itself is a compare-and-swap on the manifest.
    """
    with writer_lock(store.path / LOCK, what=f"the store at {store.path}"):
        current = read_manifest(store.path)
        if current.get("generation") != store.manifest.get("generation"):
            logg.info(f"    {store.path} changed since this Store read it (generation "
                      f"{store.manifest.get('generation')} → {current.get('generation')}): reloaded")  # fmt: skip
            store.manifest, store._arrays = current, {}
        require_writable(current, store.path)
        yield


def batch_checksum(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> int:
    """crc32 of one batch of rows: relative indptr (int64), indices (int32) and data (float32) bytes."""
    crc = 0
    for array, dtype in ((indptr - indptr[0], np.int64), (indices, np.int32), (data, np.float32)):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(array, dtype=dtype)).cast("B"), crc)
    return crc


def _row_array(group: zarr.Group, name: str, dtype: Any) -> None:
    if dtype is str:
        group.create_array(name, shape=(0,), dtype=str, chunks=(ROW_CHUNK,), compressors=string_codec())
    else:
        group.create_array(name, shape=(0,), dtype=dtype, chunks=(ROW_CHUNK,), compressors=numeric_codec())


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not isinstance(column.dtype, pd.CategoricalDtype)


def sync_created(root: Path, names: list[str]) -> None:
    """Flush files and folders (relative to the store ``root``) that others (zarr) created, with ``FSYNC``."""
    if not _format.FSYNC:
        return
    for name in names:
        path = Path(root) / name
        if path.is_dir():
            fsync_folder(path)
        elif path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())


def write_durably(tasks: list, arrays: list[ChunkedArray]) -> None:
    """Run write ``tasks`` (all files at once: their flushes to disk overlap), then flush the ``arrays``' folders.

    What a commit does before it names the values in the manifest: every byte of them is on disk first.
    """
    run_writes(tasks)
    run_writes([task for array in arrays for task in array.sync_tasks()])


def input_record(inp, index: int, missing_genes: list[str]) -> dict:
    """How the manifest records an input: name, identity (path, size, fingerprint), cells, panel genes it lacks."""
    return {"name": inp.name, **inp.identity, "n_obs": int(inp.n_obs), "missing_genes": list(missing_genes)}


def identity_of(record: dict) -> dict:
    """The part of an input record that recognises the input (what a resumed build compares)."""
    return {k: v for k, v in record.items() if k not in ("name", "missing_genes")}


def create(path: Path, *, panel: pd.Index, label_keys, group_key, obs_keys, inputs, params: dict,
           missing: list[list[str]]) -> StoreWriter:  # fmt: skip
    """A new, empty store at ``path`` (a folder holding nothing but the lock file); call it holding the lock.

    ``obs_keys`` columns that are numbers in the first input are stored as float64, others as codes;
    ``missing``: per input, the panel genes it lacks.
    """
    root = zarr.open_group(path, mode="a", zarr_format=3)  # "w" would delete the lock file
    root.attrs["cellmint_store"] = {"format_version": FORMAT_VERSION}
    X = root.create_group("X")
    X.create_array("indptr", shape=(0,), dtype="int64", chunks=(ROW_CHUNK,), compressors=numeric_codec())
    for name, dtype in (("indices", "int32"), ("data", "float32")):
        X.create_array(name, shape=(0,), dtype=dtype, chunks=(DATA_CHUNK,), compressors=numeric_codec())
    obs = root.create_group("obs")
    _row_array(obs, "names", str)
    _row_array(obs, "library_size", "float64")
    _row_array(obs, "n_genes", "int32")
    _row_array(obs, "input", "int32")
    labels = root.create_group("labels")
    for key in label_keys:
        _row_array(labels, key, "int32")
    if group_key is not None:
        _row_array(root, "groups", "int32")
    table = root.create_group("obs_table")
    numeric = {key: _is_number(inputs[0].adata.obs[key]) for key in obs_keys}
    for key in obs_keys:
        _row_array(table, key, "float64" if numeric[key] else "int32")
    var = root.create_group("var")
    var.create_array("names", shape=(0,), dtype=str, chunks=(max(1, len(panel)),), compressors=string_codec())
    names = ChunkedArray(Path(path) / "var" / "names", name="var/names")
    names.write(0, np.asarray(panel, dtype=object))
    names.set_length(len(panel))
    manifest = {
        "format_version": FORMAT_VERSION,
        "cellmint_version": __version__,
        "state": "building",
        "n_obs": 0,
        "nnz": 0,
        "n_vars": len(panel),
        "genes": list(map(str, panel)),
        "label_keys": list(label_keys),
        "labels": {key: [] for key in label_keys},
        "group_key": group_key,
        "groups": [],
        "obs_keys": list(obs_keys),
        "obs_table": {key: [] for key in obs_keys if not numeric[key]},
        "inputs": [input_record(inp, i, genes) for i, (inp, genes) in enumerate(zip(inputs, missing, strict=True))],
        "batches": [],
        "params": params,
        "generation": 0,
    }
    indptr = ChunkedArray(Path(path) / "X" / "indptr", name="X/indptr")
    indptr.write(0, np.zeros(1, dtype=np.int64))
    # the folders and zarr.json files zarr just made are on disk before the first commit names them
    created = [Path(folder, name) for folder, folders, files in os.walk(path) for name in [*files, "."]]
    sync_created(path, [str(p.relative_to(path)) for p in created])
    write_manifest(path, manifest)
    return StoreWriter(path)


@dataclass
class Batch:
    """Rows of one input, encoded and ready to commit: CSR over the panel plus one array per row array."""

    input_index: int
    input_start: int
    indptr: np.ndarray  # int64, from 0, rows + 1 values
    indices: np.ndarray  # int32
    data: np.ndarray  # float32
    rows: dict[str, np.ndarray]  # store array name → values of these rows
    categories: dict  # the manifest's category lists once these rows are encoded

    @property
    def n_obs(self) -> int:
        return len(self.indptr) - 1


class StoreWriter:
    """Appends committed batches to an existing store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(path)
        m = self.manifest
        require_writable(m, self.path)
        self._row_arrays = {name: self._open(name) for name in row_arrays(m)}
        self._X = {name: self._open(f"X/{name}") for name in ("indptr", "indices", "data")}
        self._categories = copy.deepcopy(self._category_lists(m))
        self._truncate_to_committed()

    def _open(self, name: str) -> ChunkedArray:
        return ChunkedArray(self.path / name, name=name, dtype=array_kind(name, self.manifest).dtype)

    def arrays(self) -> list[ChunkedArray]:
        """Every array this writer appends to."""
        return [*self._X.values(), *self._row_arrays.values()]

    @staticmethod
    def _category_lists(m: dict) -> dict:
        return {"labels": m["labels"], "groups": m["groups"], "obs_table": m["obs_table"]}

    def _truncate_to_committed(self) -> None:
        # after a crash, arrays may declare an uncommitted batch: declare only the committed rows
        n, nnz = self.manifest["n_obs"], self.manifest["nnz"]
        self._X["indptr"].set_length(n + 1)
        self._X["indices"].set_length(nnz)
        self._X["data"].set_length(nnz)
        for array in self._row_arrays.values():
            array.set_length(n)
        for array in self.arrays():
            array.sync()

    def resume_row(self, input_index: int) -> int:
        """First row of input ``input_index`` not yet committed."""
        done = [b["input_stop"] for b in self.manifest["batches"] if b["input"] == input_index]
        return max(done, default=0)

    @staticmethod
    def _codes(categories: list, values: pd.Series, what: str, *, blank: bool = False) -> np.ndarray:
        """Category codes of ``values`` (:func:`checked_labels`; other obs columns, ``blank=True``, may be blank)."""
        values = checked_labels(values, what, blank_is_missing=not blank)
        for value in pd.unique(values):
            if value not in categories:
                categories.append(value)  # categories only grow, so committed codes stay valid
        return pd.Index(categories).get_indexer(values).astype(np.int32)

    def encode(self, *, input_index: int, input_start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
               obs: pd.DataFrame, library_size: np.ndarray, n_genes: np.ndarray) -> Batch:  # fmt: skip
        """Encode rows ``input_start : input_start + len(obs)`` of an input (CSR already over the panel)."""
        m, cats = self.manifest, self._categories
        rows = {
            "obs/names": np.asarray(obs.index, dtype=str).astype(object),
            "obs/library_size": np.asarray(library_size, dtype=np.float64),
            "obs/n_genes": np.asarray(n_genes, dtype=np.int32),
            "obs/input": np.full(len(obs), input_index, dtype=np.int32),
        }
        for key in m["label_keys"]:
            rows[f"labels/{key}"] = self._codes(cats["labels"][key], obs[key], f"Label {key!r}")
        if m["group_key"] is not None:
            rows["groups"] = self._codes(cats["groups"], obs[m["group_key"]], f"Group {m['group_key']!r}")
        for key in m["obs_keys"]:
            column = obs[key]
            if key in cats["obs_table"]:
                rows[f"obs_table/{key}"] = self._codes(
                    cats["obs_table"][key], column, f"obs column {key!r}", blank=True
                )
            elif _is_number(column):
                rows[f"obs_table/{key}"] = column.to_numpy(dtype=np.float64)
            else:
                raise ValueError(f"obs column {key!r} holds numbers in the first input but {column.dtype} values "
                                 "in a later one; give it one type in every input.")  # fmt: skip
        return Batch(input_index, input_start, np.asarray(indptr, dtype=np.int64), indices, data, rows,
                     copy.deepcopy(cats))  # fmt: skip

    def commit(self, batch: Batch) -> None:
        """Write a batch beyond the committed rows, then commit it in one atomic manifest replacement."""
        m = self.manifest
        n0, nnz0, rows, nnz = m["n_obs"], m["nnz"], batch.n_obs, int(batch.indptr[-1])
        X = self._X
        tasks = [*X["indices"].write_tasks(nnz0, np.asarray(batch.indices, dtype=np.int32)),
                 *X["data"].write_tasks(nnz0, np.asarray(batch.data, dtype=np.float32)),
                 *X["indptr"].write_tasks(n0 + 1, nnz0 + batch.indptr[1:])]  # fmt: skip
        for name, values in batch.rows.items():
            tasks += self._row_arrays[name].write_tasks(n0, values)
        tasks += X["indptr"].length_tasks(n0 + rows + 1) + X["indices"].length_tasks(nnz0 + nnz)
        tasks += X["data"].length_tasks(nnz0 + nnz)
        for array in self._row_arrays.values():
            tasks += array.length_tasks(n0 + rows)
        write_durably(tasks, self.arrays())  # every byte of the batch is on disk before the manifest names it
        m["batches"].append({
            "input": batch.input_index, "input_start": batch.input_start, "input_stop": batch.input_start + rows,
            "rows": [n0, n0 + rows], "nnz": [nnz0, nnz0 + nnz],
            "crc32": batch_checksum(batch.indptr, batch.indices, batch.data),
            "checksums": batch_checksums(batch),
        })  # fmt: skip
        m.update(batch.categories)
        m["n_obs"], m["nnz"] = n0 + rows, nnz0 + nnz
        write_manifest(self.path, m)

    def finish(self) -> None:
        """Mark the store complete (and forget how to undo the append that just finished)."""
        self.manifest["state"] = "complete"
        self.manifest.pop("append", None)
        write_manifest(self.path, self.manifest)


def batch_checksums(batch: Batch) -> dict[str, int]:
    """crc32 of the batch's values in every per-cell array (``_format.values_checksum``)."""
    return {name: values_checksum(values) for name, values in batch.rows.items()}


def commit_split(path: Path, manifest: dict, name: str, codes: np.ndarray, record: dict) -> None:
    """Commit split ``name``: its codes in a new array, flushed, then named in ``manifest`` (updated in place).

    Every version of a split has its own array (``splits/<name>-<generation>``), so the version the
    manifest names stays intact until the commit; the one it replaces is deleted after it. Call it
    under :func:`writing`, with the handle's manifest.
    """
    array = f"splits/{name}-{manifest['generation'] + 1}"
    folder = array.split("/", 1)[1]
    splits = zarr.open_group(path, mode="r+").require_group("splits")
    if folder in splits:  # left by a split that failed before its commit
        del splits[folder]
    _row_array(splits, folder, "int8")
    written = ChunkedArray(Path(path) / array, name=array, dtype="int8")
    write_durably([*written.write_tasks(0, codes), *written.length_tasks(len(codes))], [written])
    sync_created(path, ["splits/zarr.json", "splits"])  # made by zarr: on disk before the commit names them
    replaced = manifest.get("splits", {}).get(name, {}).get("array", f"splits/{name}")
    manifest.setdefault("splits", {})[name] = {**record, "array": array, "crc32": values_checksum(codes)}
    write_manifest(path, manifest)
    if replaced != array and (Path(path) / replaced).is_dir():
        shutil.rmtree(Path(path) / replaced)  # the replaced version, no longer named by the manifest
