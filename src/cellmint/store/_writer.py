"""Write a store batch by batch; each batch is committed atomically to the manifest (see ``_format``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .. import __version__
from ._format import DATA_CHUNK, FORMAT_VERSION, ROW_CHUNK, read_manifest, write_manifest


def batch_checksum(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> str:
    """sha256 of one batch of rows: relative indptr (int64), indices (int32) and data (float32) bytes."""
    digest = hashlib.sha256()
    for array, dtype in ((indptr - indptr[0], np.int64), (indices, np.int32), (data, np.float32)):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest()


def _row_array(group: zarr.Group, name: str, dtype: Any) -> None:
    group.create_array(name, shape=(0,), dtype=dtype, chunks=(ROW_CHUNK,))


def create(path: Path, *, panel: pd.Index, label_keys, group_key, obs_keys, inputs, params: dict) -> StoreWriter:
    """A new, empty store at ``path`` (which must not exist)."""
    root = zarr.open_group(path, mode="w-", zarr_format=3)
    root.attrs["cellmint_store"] = {"format_version": FORMAT_VERSION}
    X = root.create_group("X")
    X.create_array("indptr", shape=(1,), dtype="int64", chunks=(ROW_CHUNK,))
    X["indptr"][0] = 0
    for name, dtype in (("indices", "int32"), ("data", "float32")):
        X.create_array(name, shape=(0,), dtype=dtype, chunks=(DATA_CHUNK,))
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
    for key in obs_keys:
        _row_array(table, key, "float64")  # replaced by int32 codes when the column is categorical
    var = root.create_group("var")
    var.create_array("names", shape=(len(panel),), dtype=str, chunks=(max(1, len(panel)),))
    var["names"][:] = np.asarray(panel, dtype=str)
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
        "obs_table": {},
        "inputs": [{"name": inp.name, **inp.identity, "n_obs": int(inp.n_obs)} for inp in inputs],
        "batches": [],
        "params": params,
    }
    write_manifest(path, manifest)
    return StoreWriter(path)


class StoreWriter:
    """Appends committed batches to an existing store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.root = zarr.open_group(path, mode="r+")
        self._truncate_to_committed()

    def _truncate_to_committed(self) -> None:
        # after a crash, arrays may hold an uncommitted batch: drop it
        n, nnz = self.manifest["n_obs"], self.manifest["nnz"]
        self.root["X/indptr"].resize((n + 1,))
        for name in ("X/indices", "X/data"):
            self.root[name].resize((nnz,))
        for array in self._row_arrays():
            array.resize((n,))

    def _row_arrays(self) -> list:
        arrays = [self.root[f"obs/{k}"] for k in ("names", "library_size", "n_genes", "input")]
        arrays += [self.root[f"labels/{k}"] for k in self.manifest["label_keys"]]
        arrays += [self.root[f"obs_table/{k}"] for k in self.manifest["obs_keys"]]
        if self.manifest["group_key"] is not None:
            arrays.append(self.root["groups"])
        return arrays

    def resume_row(self, input_index: int) -> int:
        """First row of input ``input_index`` not yet committed."""
        done = [b["input_stop"] for b in self.manifest["batches"] if b["input"] == input_index]
        return max(done, default=0)

    def _codes(self, categories: list, values: pd.Series, what: str) -> np.ndarray:
        values = values.astype(object)
        missing = pd.isna(values)
        if missing.any():
            raise ValueError(f"{what} is empty for {int(missing.sum())} cells; fill or drop them before building.")
        values = values.astype(str)
        for value in pd.unique(values):
            if value not in categories:
                categories.append(value)  # categories only grow, so committed codes stay valid
        return pd.Index(categories).get_indexer(values).astype(np.int32)

    def _append(self, name: str, values: np.ndarray, start: int) -> None:
        array = self.root[name]
        array.resize((start + len(values),))
        array[start:] = values

    def write_batch(self, X: sp.csr_matrix, *, input_index: int, input_start: int, obs: pd.DataFrame,
                    names: np.ndarray, library_size: np.ndarray, n_genes: np.ndarray) -> None:  # fmt: skip
        """Write rows ``input_start : input_start + X.shape[0]`` of an input, then commit them."""
        m = self.manifest
        n0, nnz0, rows = m["n_obs"], m["nnz"], X.shape[0]
        codes = {key: self._codes(m["labels"][key], obs[key], f"Label {key!r}") for key in m["label_keys"]}
        if m["group_key"] is not None:
            group_codes = self._codes(m["groups"], obs[m["group_key"]], f"Group {m['group_key']!r}")
        table = {}
        for key in m["obs_keys"]:
            column = obs[key]
            if pd.api.types.is_numeric_dtype(column) and not isinstance(column.dtype, pd.CategoricalDtype):
                table[key] = column.to_numpy(dtype=np.float64)
            else:
                categories = m["obs_table"].setdefault(key, [])
                if n0 == 0 and self.root[f"obs_table/{key}"].dtype != np.int32:
                    del self.root[f"obs_table/{key}"]
                    _row_array(self.root["obs_table"], key, "int32")
                table[key] = self._codes(categories, column, f"obs column {key!r}")
        # write beyond the committed rows ...
        self._append("X/indices", X.indices.astype(np.int32), nnz0)
        self._append("X/data", X.data.astype(np.float32), nnz0)
        indptr = self.root["X/indptr"]
        indptr.resize((n0 + rows + 1,))
        indptr[n0 + 1 :] = nnz0 + X.indptr[1:].astype(np.int64)
        self._append("obs/names", np.asarray(names, dtype=str), n0)
        self._append("obs/library_size", library_size.astype(np.float64), n0)
        self._append("obs/n_genes", n_genes.astype(np.int32), n0)
        self._append("obs/input", np.full(rows, input_index, dtype=np.int32), n0)
        for key, values in codes.items():
            self._append(f"labels/{key}", values, n0)
        if m["group_key"] is not None:
            self._append("groups", group_codes, n0)
        for key, values in table.items():
            self._append(f"obs_table/{key}", values, n0)
        # ... then commit them in one atomic manifest replacement
        m["batches"].append({
            "input": input_index, "input_start": input_start, "input_stop": input_start + rows,
            "rows": [n0, n0 + rows], "nnz": [nnz0, nnz0 + int(X.nnz)],
            "sha256": batch_checksum(X.indptr, X.indices, X.data),
        })  # fmt: skip
        m["n_obs"], m["nnz"] = n0 + rows, nnz0 + int(X.nnz)
        write_manifest(self.path, m)

    def finish(self) -> None:
        """Mark the store complete."""
        self.manifest["state"] = "complete"
        write_manifest(self.path, self.manifest)
