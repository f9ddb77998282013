"""Write an ``.h5ad`` file whose CSR matrix arrives block by block, never held whole in memory.

The file is written under a temporary name beside the target and renamed into place only when
complete (after an fsync), so a crash or an exception never leaves a partial file that looks
finished. Annotations (``obs``, ``var``, ``uns``) are written first with anndata; ``X`` follows as a
CSR group with resizable ``data``/``indices`` datasets, the layout ``anndata.read_h5ad`` reads in
memory and in backed mode.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Elements per HDF5 chunk of ``X/data`` and ``X/indices``.
H5_CHUNK = 1 << 18


class CSRAppender:
    """The ``X`` group of an open h5ad file: a CSR matrix whose rows are appended in order."""

    def __init__(
        self,
        f: h5py.File,
        n_obs: int,
        n_vars: int,
        *,
        dtype: Any = np.float32,
        compression: str | None = None,
        name: str = "X",
    ):
        group = f.create_group(name)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_obs, n_vars], dtype=np.int64)
        kw = {"compression": compression} if compression else {}
        index_dtype = np.int32 if n_vars < 2**31 else np.int64
        self.data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(H5_CHUNK,), **kw)
        self.indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=index_dtype, chunks=(H5_CHUNK,), **kw
        )
        self.indptr = group.create_dataset("indptr", shape=(n_obs + 1,), dtype=np.int64)
        self.indptr[0] = 0
        self.n_obs, self.n_vars = n_obs, n_vars
        self.rows = 0
        self.nnz = 0

    def append(self, blocks: list[sp.csr_matrix]) -> None:
        """Append the rows of one or more CSR blocks."""
        if not blocks:
            return
        block = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        if block.shape[1] != self.n_vars or self.rows + block.shape[0] > self.n_obs:
            raise ValueError(
                f"Block of shape {block.shape} does not fit: {self.rows} of {self.n_obs} rows written, "
                f"{self.n_vars} columns expected."
            )
        end = self.nnz + block.nnz
        self.indptr[self.rows + 1 : self.rows + 1 + block.shape[0]] = self.nnz + block.indptr[1:]
        for dataset, values in ((self.data, block.data), (self.indices, block.indices)):
            dataset.resize((end,))
            dataset[self.nnz : end] = values
        self.rows += block.shape[0]
        self.nnz = end


def write_h5ad_streamed(
    path: str | Path,
    blocks: Iterable[sp.csr_matrix],
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    uns: dict | None = None,
    dtype: Any = np.float32,
    buffer_rows: int = 10_000,
    compression: str | None = None,
) -> Path:
    """Write ``obs``/``var``/``uns`` and a CSR ``X`` streamed from ``blocks`` (rows in order) to ``path``.

    Blocks are gathered until ``buffer_rows`` cells are waiting, then appended: memory stays near one
    buffer. The rows of all blocks must add up to ``len(obs)``.
    """
    target = Path(path)
    n_obs, n_vars = len(obs), len(var)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        ad.AnnData(obs=obs, var=var, uns=uns or {}).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            X = CSRAppender(f, n_obs, n_vars, dtype=dtype, compression=compression)
            buffer, buffered = [], 0
            for block in blocks:
                buffer.append(block)
                buffered += block.shape[0]
                if buffered >= buffer_rows:
                    X.append(buffer)
                    buffer, buffered = [], 0
            X.append(buffer)
            if X.rows != n_obs:
                raise ValueError(f"The blocks held {X.rows} cells, but obs has {n_obs}.")
            f.flush()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
