"""The read side of ``cm.Store``: opening a store (its manifest checked), shape, per-cell table, counts, splits.

A handle trusts only its manifest (read, with its checksum, when opened or reloaded): rows and split
codes beyond what it commits are never read. ``Store`` adds the writes (``_writer``, ``_append``,
``_split``), the loader (``_sampling``) and ``verify`` (``_verify``) to this class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import _split
from ._arrays import ChunkedArray
from ._format import array_kind, read_manifest

if TYPE_CHECKING:
    from ._store import Store


class StoreReader:
    """What a :class:`cellmint.Store` reads; see there."""

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

    # -- overview ----------------------------------------------------------------------------
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
        return f"{type(self).__name__}({str(self.path)!r}: {self.n_obs:,} cells × {self.n_vars:,} genes{labels}{state})"
