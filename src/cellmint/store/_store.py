"""``cm.Store``: read access to a store built by :func:`cellmint.pp.build_store`."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from ._format import read_manifest
from ._writer import batch_checksum


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
        self._root = zarr.open_group(self.path, mode="r")

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
        codes = np.asarray(self._root[name][: self.n_obs])
        return pd.Categorical.from_codes(codes, categories=categories)

    def obs(self) -> pd.DataFrame:
        """Per-cell table: library size and detected genes (all genes of the input), input, labels, group, obs keys."""
        root, n = self._root, self.n_obs
        df = pd.DataFrame(
            {
                "library_size": np.asarray(root["obs/library_size"][:n]),
                "n_genes": np.asarray(root["obs/n_genes"][:n]),
                "input": pd.Categorical.from_codes(
                    np.asarray(root["obs/input"][:n]), categories=[i["name"] for i in self.manifest["inputs"]]
                ),
            },
            index=pd.Index(np.asarray(root["obs/names"][:n]).astype(object)),
        )
        if not df.index.is_unique:  # the same cell names in several inputs: suffix the input's index
            df.index = df.index.astype(str) + "-" + np.asarray(root["obs/input"][:n]).astype(str).astype(object)
        for key, values in self.labels.items():
            df[key] = values
        if (groups := self.groups) is not None:
            df[self.manifest["group_key"]] = groups
        for key in self.manifest["obs_keys"]:
            values = np.asarray(root[f"obs_table/{key}"][:n])
            categories = self.manifest["obs_table"].get(key)
            df[key] = pd.Categorical.from_codes(values, categories=categories) if categories is not None else values
        return df

    # -- counts ------------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of cells ``start:stop`` (a contiguous read), as CSR over the gene panel."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"Rows {start}:{stop} are outside the store's {self.n_obs} cells.")
        indptr = np.asarray(self._root["X/indptr"][start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = np.asarray(self._root["X/data"][lo:hi])
        indices = np.asarray(self._root["X/indices"][lo:hi])
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_vars))

    def to_adata(self) -> ad.AnnData:
        """The whole store as an in-memory AnnData (counts in ``X``; ``obs`` as :meth:`obs`)."""
        X = self.read_rows(0, self.n_obs)
        return ad.AnnData(X=X, obs=self.obs(), var=pd.DataFrame(index=self.var_names))

    # -- integrity ---------------------------------------------------------------------------
    def verify(self) -> dict:
        """Check the store against its manifest: checksums of every batch, row counts, CSR invariants.

        Returns
        -------
        A summary (``{"batches": ..., "cells": ..., "nnz": ...}``) when everything holds.

        Raises
        ------
        ValueError
            Listing every problem found (corrupted batch, truncated array, invalid gene index, …).
        """
        problems = []
        root, n, nnz = self._root, self.n_obs, self.nnz
        for name, need in (("X/indptr", n + 1), ("X/indices", nnz), ("X/data", nnz), ("obs/names", n)):
            if root[name].shape[0] < need:
                problems.append(f"{name} holds {root[name].shape[0]} values, the manifest commits {need}")
        if not problems:
            indptr = np.asarray(root["X/indptr"][: n + 1], dtype=np.int64)
            if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
                problems.append("X/indptr does not run from 0 to nnz in increasing order")
            expected_rows = 0
            for i, batch in enumerate(self.manifest["batches"]):
                r0, r1 = batch["rows"]
                if r0 != expected_rows:
                    problems.append(f"batch {i} starts at row {r0}, expected {expected_rows}")
                expected_rows = r1
                lo, hi = int(indptr[r0]), int(indptr[r1])
                if [lo, hi] != batch["nnz"]:
                    problems.append(f"batch {i} (rows {r0}:{r1}) spans values {lo}:{hi}, manifest says {batch['nnz']}")
                    continue
                indices = np.asarray(root["X/indices"][lo:hi])
                data = np.asarray(root["X/data"][lo:hi])
                if indices.size and (indices.min() < 0 or indices.max() >= self.n_vars):
                    problems.append(f"batch {i} (rows {r0}:{r1}) has gene indices outside the panel")
                if batch_checksum(indptr[r0 : r1 + 1], indices, data) != batch["sha256"]:
                    problems.append(f"batch {i} (rows {r0}:{r1}, input {batch['input']}) fails its sha256 checksum")
            if expected_rows != n:
                problems.append(f"committed batches cover {expected_rows} rows, the manifest says {n}")
        if problems:
            raise ValueError(f"The store at {self.path} is damaged:\n- " + "\n- ".join(problems))
        return {"batches": len(self.manifest["batches"]), "cells": n, "nnz": nnz}

    def summary(self) -> dict:
        """Cells, genes, stored counts, inputs, and the class balance per label key and per group."""
        out = {
            "cells": self.n_obs, "genes": self.n_vars, "nnz": self.nnz, "complete": self.complete,
            "inputs": {i["name"]: i["n_obs"] for i in self.manifest["inputs"]},
            "labels": {key: pd.Series(values).value_counts().to_dict() for key, values in self.labels.items()},
        }  # fmt: skip
        if (groups := self.groups) is not None:
            out["groups"] = pd.Series(groups).value_counts().to_dict()
        return out

    def __repr__(self) -> str:
        state = "" if self.complete else ", build interrupted"
        labels = f", labels {self.label_keys}" if self.label_keys else ""
        return f"Store({str(self.path)!r}: {self.n_obs:,} cells × {self.n_vars:,} genes{labels}{state})"
