"""Row chunks of a cells × genes matrix, wherever it lives: the one reader HVG, store and annotate share.

A matrix source answers ``shape``, ``dtype``, ``nnz`` (when known without reading) and
``read(start, stop)``; :func:`iter_row_chunks` walks it in bounded-memory blocks. Sources exist for
in-memory arrays (dense, CSR, CSC), on-disk arrays and compressed-sparse groups of h5ad/zarr files
(backed AnnData or a path) and dask arrays (``anndata.experimental.read_lazy``).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ._progress import progress_bar
from ._threads import background

ChunkFormat = Literal["native", "csr", "dense"]

#: Memory one chunk aims at when ``chunk_size=None``.
TARGET_CHUNK_BYTES = 256 * 2**20


class RowChunk(NamedTuple):
    """Rows ``start:stop`` of the matrix, as a CSR matrix or a dense array.

    ``X`` may share memory with an in-memory source matrix: treat it as read-only.
    """

    start: int
    stop: int
    X: np.ndarray | sp.csr_matrix


class MatrixSource(Protocol):
    """What :func:`iter_row_chunks` needs from a matrix."""

    shape: tuple[int, int]
    dtype: np.dtype
    is_sparse: bool
    #: how the matrix is laid out where it lives: "csr", "csc", "dense" or "dask"
    storage: str

    @property
    def nnz(self) -> int | None: ...

    def read(self, start: int, stop: int) -> np.ndarray | sp.csr_matrix: ...


class _InMemory:
    def __init__(self, X: Any):
        if isinstance(X, np.matrix):
            X = np.asarray(X)
        if sp.issparse(X) and X.format not in {"csr", "csc"}:
            X = sp.csr_matrix(X)
        self.X = X
        self.shape = tuple(X.shape)
        self.dtype = np.dtype(X.dtype)
        self.is_sparse = sp.issparse(X)
        self.storage = X.format if self.is_sparse else "dense"

    @property
    def nnz(self) -> int:
        return int(self.X.nnz) if self.is_sparse else self.shape[0] * self.shape[1]

    def read(self, start: int, stop: int):
        if self.storage == "csr":
            # a view on the rows' stored values (scipy's row slicing copies them, slowly)
            lo, hi = self.X.indptr[start], self.X.indptr[stop]
            indptr = np.asarray(self.X.indptr[start : stop + 1], dtype=np.int64) - lo
            return sp.csr_matrix(
                (self.X.data[lo:hi], self.X.indices[lo:hi], indptr), shape=(stop - start, self.shape[1])
            )
        block = self.X[start:stop]
        return sp.csr_matrix(block) if self.is_sparse else np.asarray(block)


class _OnDiskDense:
    """An ``h5py.Dataset`` or ``zarr.Array``: a row slice reads only those rows."""

    is_sparse = False
    storage = "dense"

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.shape = tuple(dataset.shape)
        self.dtype = np.dtype(dataset.dtype)

    @property
    def nnz(self) -> int:
        return self.shape[0] * self.shape[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.dataset[start:stop])


class _OnDiskCompressed:
    """A CSR/CSC group (``data``, ``indices``, ``indptr``) of an h5ad file or zarr store.

    CSR reads exactly the stored values of the requested rows: ``indptr`` is held in memory (8 bytes
    per cell), ``data`` and ``indices`` are sliced. CSC has no cheap row access: each chunk scans
    all columns block by block (bounded memory, but the whole matrix is read once per chunk).
    """

    is_sparse = True

    def __init__(self, group: Any, *, name: str = "X"):
        fmt = _encoding_type(group)
        if fmt not in {"csr_matrix", "csc_matrix"}:
            raise ValueError(f"{name!r} is stored as {fmt!r}, not as a CSR/CSC sparse matrix.")
        self.format = self.storage = fmt[:3]
        self.group = group
        self.shape = tuple(int(s) for s in group.attrs["shape"])
        self.dtype = np.dtype(group["data"].dtype)
        self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)
        self._check_structure(name)
        if self.format == "csc":
            warnings.warn(
                f"{name!r} is stored on disk as CSC: reading rows scans the whole matrix once per chunk. "
                "Rewrite it as CSR (e.g. `adata.X = adata.X.tocsr()` before writing) for fast row access.",
                UserWarning,
                stacklevel=4,
            )

    def _check_structure(self, name: str) -> None:
        n_major = self.shape[0] if self.format == "csr" else self.shape[1]
        n_data, n_indices = self.group["data"].shape[0], self.group["indices"].shape[0]
        problem = None
        if len(self.indptr) != n_major + 1:
            problem = (
                f"indptr has {len(self.indptr)} entries for {n_major} {'rows' if self.format == 'csr' else 'columns'}"
            )
        elif self.indptr[0] != 0 or np.any(np.diff(self.indptr) < 0):
            problem = "indptr does not start at 0 and increase"
        elif not (self.indptr[-1] == n_data == n_indices):
            problem = f"indptr ends at {self.indptr[-1]} but data has {n_data} and indices {n_indices} values"
        if problem:
            raise ValueError(f"The sparse matrix {name!r} is corrupted: {problem} (shape {self.shape}).")

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        n_vars = self.shape[1]
        if self.format == "csr":
            lo, hi = int(self.indptr[start]), int(self.indptr[stop])
            indptr = self.indptr[start : stop + 1] - lo
            data = np.asarray(self.group["data"][lo:hi])
            indices = np.asarray(self.group["indices"][lo:hi])
            if indices.size and (indices.min() < 0 or indices.max() >= n_vars):
                raise ValueError(
                    f"The sparse matrix on disk is corrupted: rows {start}:{stop} hold gene indices outside "
                    f"0..{n_vars - 1}."
                )
            return sp.csr_matrix((data, indices, indptr), shape=(stop - start, n_vars))
        return self._read_csc(start, stop)

    def _read_csc(self, start: int, stop: int) -> sp.csr_matrix:
        n_vars = self.shape[1]
        rows, cols, vals = [], [], []
        # columns per read so that one block of indices + values stays near the chunk budget
        step = max(1, int(TARGET_CHUNK_BYTES // max(1.0, 12 * self.nnz / max(1, n_vars))))
        for c0 in range(0, n_vars, step):
            c1 = min(n_vars, c0 + step)
            lo, hi = int(self.indptr[c0]), int(self.indptr[c1])
            indices = np.asarray(self.group["indices"][lo:hi])
            keep = (indices >= start) & (indices < stop)
            if not keep.any():
                continue
            col = np.repeat(np.arange(c0, c1), np.diff(self.indptr[c0 : c1 + 1]))
            rows.append(indices[keep] - start)
            cols.append(col[keep])
            vals.append(np.asarray(self.group["data"][lo:hi])[keep])
        if not rows:
            return sp.csr_matrix((stop - start, n_vars), dtype=self.dtype)
        coo = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(stop - start, n_vars)
        )
        return coo.tocsr()


def _cluster_client():
    """The ``dask.distributed`` client dask computes with now (the default client, if it is the active scheduler)."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        client = default_client()
    except ValueError:  # no client
        return None
    import dask

    return client if dask.base.get_scheduler() == client.get else None


class _Dask:
    """A dask array; each chunk is computed with the active dask scheduler.

    On a ``dask.distributed`` cluster, :meth:`read_all` submits chunks ahead (two per worker thread),
    so the workers read, decompress and compute them concurrently while the caller takes them in
    order — whatever the caller adds up, it adds up in row order, exactly as from one machine.
    :func:`map_on_cluster` runs a function on each chunk where it is computed, for results smaller
    than the chunk.
    """

    storage = "dask"

    def __init__(self, X: Any):
        self.X = X
        self.shape = tuple(int(s) for s in X.shape)
        self.dtype = np.dtype(X.dtype)
        self.is_sparse = sp.issparse(X._meta)

    @property
    def nnz(self) -> None:
        return None

    def read(self, start: int, stop: int):
        block = self.X[start:stop].compute()
        return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)

    def native_chunk_rows(self) -> int:
        return int(self.X.chunks[0][0]) if self.X.chunks[0] else 1

    def read_all(self, starts: range, size: int) -> Iterator:
        """The blocks of ``size`` rows from each of ``starts``, in order (computed ahead on a cluster)."""
        client = _cluster_client()
        if client is None:
            n_obs = self.shape[0]
            for start in starts:
                yield self.read(start, min(n_obs, start + size))
            return
        for block in self.compute_all(client, starts, size):
            yield sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)

    def compute_all(self, client, starts: range, size: int, task: Callable | None = None,
                    per_chunk: Callable | None = None) -> Iterator:  # fmt: skip
        """``task(block, start, stop, **per_chunk(start, stop))`` (or the block) per row block, in order.

        Blocks are submitted two per worker thread ahead of the one being handed out, so the
        workers run concurrently while the caller takes the results in row order.
        """
        import dask

        n_obs = self.shape[0]

        def submit(start: int):
            stop = min(n_obs, start + size)
            if task is None:
                return client.compute(self.X[start:stop])
            extra = per_chunk(start, stop) if per_chunk is not None else {}
            return client.compute(dask.delayed(task)(self.X[start:stop], start, stop, **extra))

        todo = iter(starts)
        pending = deque(submit(start) for start in islice(todo, max(2, 2 * sum(client.nthreads().values()))))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(submit(start) for start in islice(todo, 1))
                yield result
        finally:
            for future in pending:  # the caller stopped early (or failed): free the workers
                future.cancel()


def map_on_cluster(data: Any, task: Callable, *, layer: str | None = None, chunk_size: int | None = None,
                   per_chunk: Callable | None = None) -> Iterator[tuple[int, int, Any]] | None:  # fmt: skip
    """``(start, stop, task(block, start, stop, **per_chunk(start, stop)))`` per row chunk, on a cluster, in order.

    Each chunk's ``task`` runs on the worker that computed the chunk; ``per_chunk`` gives its own
    arguments (e.g. that chunk's slice of a per-cell vector).

    ``None`` unless ``data`` is dask-backed and a ``dask.distributed`` client is the active scheduler:
    then the caller reads chunks itself (:func:`iter_row_chunks`).
    """
    client = _cluster_client()
    if client is None:
        return None
    with open_matrix(data, layer=layer) as source:
        if not isinstance(source, _Dask):
            return None
        size = int(chunk_size) if chunk_size is not None else auto_chunk_size(source)
        starts = range(0, source.shape[0], size)
        n_obs = source.shape[0]
        results = source.compute_all(client, starts, size, task, per_chunk)
    return ((start, min(n_obs, start + size), result) for start, result in zip(starts, results, strict=True))


class _RowSubset:
    """Rows and columns of a larger source: a view of a backed AnnData reads only its own rows.

    Consecutive selected rows are read as one run, so a contiguous or sorted view costs about what
    the rows themselves cost.
    """

    def __init__(self, base: MatrixSource, rows: np.ndarray, cols: np.ndarray | None):
        self.base = base
        self.rows = rows
        self.cols = cols
        self.shape = (len(rows), base.shape[1] if cols is None else len(cols))
        self.dtype = base.dtype
        self.is_sparse = base.is_sparse
        self.storage = base.storage

    @property
    def nnz(self) -> None:
        return None

    def read(self, start: int, stop: int):
        rows = self.rows[start:stop]
        if isinstance(self.base, _InMemory):  # scipy/numpy gather scattered rows in one call
            block = self.base.X[rows]
            block = sp.csr_matrix(block) if self.is_sparse else np.asarray(block)
            return block if self.cols is None else block[:, self.cols]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        blocks = [self.base.read(int(run[0]), int(run[-1]) + 1) for run in np.split(sorted_rows, breaks) if len(run)]
        if not blocks:
            block = (
                sp.csr_matrix((0, self.base.shape[1]), dtype=self.dtype)
                if self.is_sparse
                else np.empty((0, self.base.shape[1]), dtype=self.dtype)
            )
        else:
            block = sp.vstack(blocks, format="csr") if self.is_sparse else np.vstack(blocks)
        if not np.array_equal(order, np.arange(len(order))):
            block = block[np.argsort(order)]
        return block if self.cols is None else block[:, self.cols]


def _as_positions(index: Any, n: int) -> np.ndarray:
    return np.arange(n)[index]


def _encoding_type(elem: Any) -> str:
    value = elem.attrs.get("encoding-type", "array")
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_dask(X: Any) -> bool:
    return type(X).__module__.split(".")[0] == "dask"


def _source_from_array(X: Any, *, name: str) -> MatrixSource:
    if _is_dask(X):
        return _Dask(X)
    if isinstance(X, np.ndarray | np.matrix) or sp.issparse(X):
        return _InMemory(X)
    group = getattr(X, "group", None)  # anndata's backed sparse dataset
    if group is not None:
        return _OnDiskCompressed(group, name=name)
    if hasattr(X, "attrs") and hasattr(X, "keys"):  # h5py.Group / zarr.Group
        return _OnDiskCompressed(X, name=name)
    if hasattr(X, "shape") and hasattr(X, "dtype") and hasattr(X, "__getitem__"):  # h5py.Dataset / zarr.Array
        return _OnDiskDense(X)
    raise TypeError(f"Cannot read rows of {name!r}: unsupported matrix type {type(X).__name__}.")


def layer_error(layer: str, available: Any) -> KeyError:
    """The one error for a layer that is not there (every reader raises it)."""
    names = sorted(k for k in available if k is not None)  # anndata >= 0.13 lists X as layers[None]
    return KeyError(f"Layer {layer!r} not found; available layers: {names or 'none'}.")


def _open_file_element(root: Any, layer: str | None, path: Path) -> MatrixSource:
    if layer is None:
        if "X" not in root:
            raise KeyError(f"{path} has no X matrix; pass `layer=` to read one of its layers.")
        elem, name = root["X"], "X"
    else:
        layers = root["layers"] if "layers" in root else {}
        if layer not in layers:
            raise layer_error(layer, layers.keys())
        elem, name = layers[layer], f"layers/{layer}"
    if _encoding_type(elem) in {"csr_matrix", "csc_matrix"}:
        return _OnDiskCompressed(elem, name=name)
    return _OnDiskDense(elem)


def open_h5(path: str | Path):
    """An HDF5 file opened read-only; a clear ``ValueError`` when the file is not HDF5, truncated or damaged."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an .h5ad file; give the path of the file itself.")
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file: {path}") from None
    except OSError as err:  # h5py's reason is in parentheses: "file signature not found", "truncated file: ..."
        reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
        raise ValueError(f"{path} is not a readable .h5ad file ({reason}): it is not HDF5, or it was truncated or "
                         "damaged (e.g. an interrupted copy). Check or copy the file again.") from None  # fmt: skip


def read_h5ad(path: str | Path, *, backed: str | None = "r") -> AnnData:
    """``anndata.read_h5ad`` with clear errors for files that are not HDF5, are damaged, or hold no AnnData."""
    import anndata as ad

    open_h5(path).close()
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as err:  # anndata raises KeyError, AnnDataReadError, OSError, ... for foreign or damaged files
        raise ValueError(f"{path} is an HDF5 file, but anndata cannot read an AnnData from it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). Is it an .h5ad file, complete and "
                         "undamaged?") from None  # fmt: skip


@contextmanager
def open_root(path: str | Path) -> Iterator[Any]:
    """The root group of an ``.h5ad`` file or a ``.zarr`` store, opened read-only (closed on exit)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file or store: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad" or (suffix in {".h5", ".hdf5"} and _looks_like_h5ad(path)):
        with open_h5(path) as root:
            yield root
    elif suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        import zarr

        yield zarr.open_group(path, mode="r")
    else:
        raise ValueError(f"Cannot read {path}: expected an .h5ad file or a .zarr store.")


@contextmanager
def open_matrix(data: AnnData | str | Path | Any, *, layer: str | None = None) -> Iterator[MatrixSource]:
    """Open the cells × genes matrix of ``data`` for row access, without loading it.

    Parameters
    ----------
    data
        AnnData (in memory, backed or dask-backed), a path to ``.h5ad``/``.zarr``, or a bare matrix
        (NumPy, SciPy sparse, dask array, ``h5py``/``zarr`` array or sparse group).
    layer
        Read ``layers[layer]`` instead of ``X``.

    Yields
    ------
    A matrix source with ``shape``, ``dtype``, ``is_sparse``, ``nnz`` and ``read(start, stop)``.
    Files opened here are closed when the ``with`` block ends.
    """
    with ExitStack() as stack:
        if isinstance(data, str | Path):
            path = Path(data)
            yield _open_file_element(stack.enter_context(open_root(path)), layer, path)
        elif isinstance(data, AnnData):
            yield _source_from_anndata(data, layer)
        else:
            if layer is not None:
                raise ValueError("`layer` applies to AnnData or file inputs, not to a bare matrix.")
            yield _source_from_array(data, name="X")


def _looks_like_h5ad(path: Path) -> bool:
    with open_h5(path) as f:
        return "X" in f and "obs" in f


def _source_from_anndata(adata: AnnData, layer: str | None) -> MatrixSource:
    if adata.isbacked and adata.is_view and layer is None:
        # anndata has no public handle on a view's parent rows; _adata_ref/_oidx/_vidx are stable since 0.7
        parent = adata._adata_ref
        cols = _as_positions(adata._vidx, parent.n_vars)
        full_cols = len(cols) == parent.n_vars and np.array_equal(cols, np.arange(parent.n_vars))
        return _RowSubset(
            _source_from_array(parent.X, name="X"),
            _as_positions(adata._oidx, parent.n_obs),
            None if full_cols else cols,
        )
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass `layer=` to read one of the layers.")
        return _source_from_array(adata.X, name="X")
    if layer not in adata.layers:
        raise layer_error(layer, adata.layers.keys())
    return _source_from_array(adata.layers[layer], name=f"layers/{layer}")


def auto_chunk_size(source: MatrixSource, *, fmt: ChunkFormat = "native") -> int:
    """Rows per chunk so that one chunk takes about :data:`TARGET_CHUNK_BYTES`."""
    n_obs, n_vars = source.shape
    if n_obs == 0:
        return 1
    if isinstance(source, _Dask):
        return max(1, source.native_chunk_rows())
    itemsize = source.dtype.itemsize
    dense_row = n_vars * itemsize
    if source.is_sparse and fmt != "dense":
        nnz = source.nnz
        # Unknown density (views): assume 10% non-zero, typical of single-cell counts.
        per_row = (nnz / n_obs) if nnz is not None else 0.1 * n_vars
        row_bytes = max(1.0, per_row * (itemsize + 8))  # value + index, with slack for int64 indices
    else:
        row_bytes = max(1, dense_row)
    return int(np.clip(TARGET_CHUNK_BYTES // row_bytes, 1, n_obs))


def _convert(block: np.ndarray | sp.spmatrix, fmt: ChunkFormat):
    if fmt == "dense" and sp.issparse(block):
        return block.toarray()
    if fmt == "csr" and not sp.issparse(block):  # scipy has no float16 sparse matrices
        return sp.csr_matrix(block.astype(np.float32) if block.dtype == np.float16 else block)
    return block


def iter_row_chunks(
    data: AnnData | str | Path | Any,
    *,
    layer: str | None = None,
    chunk_size: int | None = None,
    fmt: ChunkFormat = "native",
    progress: bool | None = False,
    desc: str = "reading cells",
    prefetch: bool = False,
    start: int = 0,
    rows: np.ndarray | None = None,
) -> Iterator[RowChunk]:
    """Iterate over consecutive row blocks of a matrix with bounded memory.

    Parameters
    ----------
    data
        See :func:`open_matrix`.
    layer
        Read ``layers[layer]`` instead of ``X``.
    chunk_size
        Rows per block; ``None`` picks about 256 MiB per block (:func:`auto_chunk_size`).
    fmt
        ``"native"`` yields CSR for sparse and ``ndarray`` for dense storage; ``"csr"`` or
        ``"dense"`` convert every block.
    progress
        Progress bar over cells (``None``: only in an interactive terminal or notebook).
    desc
        Label of the progress bar.
    prefetch
        Read the next block in a background thread while the caller works on the current one
        (up to three blocks in memory). Pays off for on-disk data when the caller's work releases the GIL.
    start
        First row to read (e.g. to resume an interrupted pass); blocks are ``chunk_size`` rows from there.
    rows
        Read only these rows, in this order (positions); ``start``/``stop`` of a chunk then count
        positions in ``rows``.

    Yields
    ------
    :class:`RowChunk` ``(start, stop, X)`` covering rows ``0 .. n_obs`` in order, without gaps.
    """
    if fmt not in {"native", "csr", "dense"}:
        raise ValueError(f"fmt must be 'native', 'csr' or 'dense', not {fmt!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, not {chunk_size!r}.")
    with open_matrix(data, layer=layer) as source:
        if rows is not None:
            source = _RowSubset(source, np.asarray(rows, dtype=np.int64), None)
        n_obs = source.shape[0]
        size = int(chunk_size) if chunk_size is not None else auto_chunk_size(source, fmt=fmt)
        if not 0 <= start <= n_obs:
            raise ValueError(f"start={start} is outside 0..{n_obs}.")
        starts = range(start, n_obs, size)

        def checked(first: int, block) -> RowChunk:
            stop = min(n_obs, first + size)
            if block.shape != (stop - first, source.shape[1]):
                raise ValueError(
                    f"Rows {first}:{stop} came back with shape {block.shape}; the matrix is corrupted or "
                    f"inconsistent with its declared shape {source.shape}."
                )
            return RowChunk(first, stop, _convert(block, fmt))

        with progress_bar(total=n_obs - start, desc=desc, unit="cells", progress=progress) as bar:
            if isinstance(source, _Dask):
                blocks = source.read_all(starts, size)
            else:
                blocks = (source.read(first, min(n_obs, first + size)) for first in starts)
            chunks = map(checked, starts, blocks)
            for chunk in background(chunks, depth=1, name="cellmint-prefetch") if prefetch else chunks:
                yield chunk
                bar.update(chunk.stop - chunk.start)
