"""Whole-chunk reads and crash-safe appends for the store's 1-D zarr v3 arrays.

Every array of a store is an ordinary zarr v3 array (any zarr reader opens it). The store's hot
paths, ingest and the loader, touch thousands of chunks per second, where zarr's general machinery
costs about 0.2 ms per chunk; so this module reads and writes the chunk files of the store's arrays
directly, for the one layout the store creates (see ``_format``): 1-D, regular chunks, default ``/``
chunk keys, codecs ``bytes`` (little endian) + ``blosc`` for numbers and ``vlen-utf8`` + ``zstd``
for strings. Anything else is refused, and tests check that every array round-trips through zarr.

Crash safety: a chunk file is replaced atomically (written to a temporary file, then renamed), so
rewriting the partly filled last chunk of committed rows can never damage them; ``zarr.json`` is
replaced the same way when the length changes.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np

from .._utils._files import replace_atomically

_pools: dict[int, ThreadPoolExecutor] = {}
_local = threading.local()


def _scratch(size: int, dtype: np.dtype) -> np.ndarray:
    """A buffer of this thread, reused between chunks: fresh buffers cost page faults on every chunk."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (size, np.dtype(dtype).str)
    if key not in buffers:
        buffers[key] = np.empty(size, dtype=dtype)
    return buffers[key]


def _pool() -> ThreadPoolExecutor:
    """Threads that encode or decode chunks in parallel (blosc and zstd release the GIL).

    One pool per process: a pool inherited through ``fork`` (torch DataLoader workers) has no threads.
    """
    pid = os.getpid()
    if pid not in _pools:
        _pools[pid] = ThreadPoolExecutor(max_workers=max(1, min(4, len(os.sched_getaffinity(0)))),
                                         thread_name_prefix="cellmint-chunks")  # fmt: skip
    return _pools[pid]


def replace_file(path: Path, payload: bytes) -> None:
    """Replace a chunk or ``zarr.json`` atomically (not fsynced: the manifest commit is the durable step)."""
    replace_atomically(path, payload, durable=False)


class ChunkedArray:
    """One 1-D array of a store, read and appended a chunk file at a time.

    Parameters
    ----------
    path
        The array's folder (holding ``zarr.json``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "zarr.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"The store array {self.path} is missing or damaged: {err}") from err
        self._meta = meta
        codecs = [c["name"] for c in meta.get("codecs", [])]
        grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
        keys = meta.get("chunk_key_encoding", {})
        if (
            len(meta.get("shape", [])) != 1
            or len(grid) != 1
            or keys.get("name") != "default"
            or keys.get("configuration", {}).get("separator", "/") != "/"
            or codecs not in (["bytes", "blosc"], ["vlen-utf8", "zstd"])
        ):
            raise ValueError(f"The store array {self.path} has a layout this cellmint does not write ({codecs}).")
        self.chunk = int(grid[0])
        self.is_str = codecs[0] == "vlen-utf8"
        if self.is_str:
            self.dtype = np.dtype(object)
            self.fill = ""
            self._vlen = numcodecs.VLenUTF8()
            self._codec = numcodecs.Zstd(level=meta["codecs"][1]["configuration"].get("level", 0))
        else:
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            self.fill = self.dtype.type(meta.get("fill_value", 0))
            blosc = meta["codecs"][1]["configuration"]
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.get("shuffle", "shuffle")]
            self._codec = numcodecs.Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=shuffle)

    @property
    def length(self) -> int:
        """The array's declared length (``shape[0]`` in ``zarr.json``)."""
        return int(self._meta["shape"][0])

    def _file(self, index: int) -> Path:
        return self.path / "c" / str(index)

    # -- reading ---------------------------------------------------------------------------
    def _decode(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``index`` (``out``: a preallocated chunk-sized buffer to decode into; it saves an allocation)."""
        try:
            raw = self._file(index).read_bytes()
        except FileNotFoundError:  # zarr semantics: a chunk never written holds the fill value
            values = np.full(self.chunk, self.fill, dtype=self.dtype)
            if out is not None:
                out[:] = values
            return values
        try:
            if self.is_str:
                values = self._vlen.decode(self._codec.decode(raw))
            else:
                values = np.frombuffer(self._codec.decode(raw, out=out), dtype=self.dtype)
        except Exception as err:  # any codec failure means a damaged chunk file
            raise ValueError(f"Chunk {index} of the store array {self.path} is damaged: {err}") from err
        if len(values) != self.chunk:
            raise ValueError(f"Chunk {index} of the store array {self.path} holds {len(values)} values, "
                             f"not {self.chunk}: the file is damaged.")  # fmt: skip
        return values

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values ``start:stop``, decoded straight into ``out`` (allocated when not given) where chunks allow."""
        if out is None:
            out = np.empty(max(0, stop - start), dtype=self.dtype)
        read_spans([(self, [(start, stop)], out)])
        return out

    def _pieces(self, spans: list[tuple[int, int]]) -> dict[int, list[tuple[int, int, int]]]:
        """For spans read one after another into one buffer: chunk → [(first, stop) within it, offset in buffer]."""
        pieces: dict[int, list[tuple[int, int, int]]] = {}
        offset = 0
        for start, stop in spans:
            for index in range(start // self.chunk, (stop - 1) // self.chunk + 1 if stop > start else 0):
                lo, hi = max(start, index * self.chunk), min(stop, (index + 1) * self.chunk)
                base = index * self.chunk
                pieces.setdefault(index, []).append((lo - base, hi - base, offset + lo - start))
            offset += max(0, stop - start)
        return pieces

    def _fill(self, index: int, pieces: list[tuple[int, int, int]], out: np.ndarray) -> None:
        if len(pieces) == 1 and pieces[0][1] - pieces[0][0] == self.chunk and not self.is_str:
            self._decode(index, out=out[pieces[0][2] : pieces[0][2] + self.chunk])  # a whole chunk: in place
            return
        scratch = None if self.is_str else _scratch(self.chunk, self.dtype)
        values = self._decode(index, out=scratch)  # decoded once for every span that needs it
        for lo, hi, at in pieces:
            out[at : at + hi - lo] = values[lo:hi]

    # -- appending -------------------------------------------------------------------------
    def _encode(self, values: np.ndarray) -> bytes:
        if len(values) < self.chunk:  # zarr stores the last chunk at full size, padded with the fill value
            padded = np.full(self.chunk, self.fill, dtype=self.dtype)
            padded[: len(values)] = values
            values = padded
        if self.is_str:
            return self._codec.encode(self._vlen.encode(np.asarray(values, dtype=object)))
        return self._codec.encode(np.ascontiguousarray(values, dtype=self.dtype))

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``values`` at ``start:start + len(values)``; values before ``start`` are kept.

        Values before ``start`` must be committed, values from ``start`` on not yet: the one chunk that
        mixes both is replaced atomically, later chunks are written in place. The declared length is not
        changed (see :meth:`set_length`).
        """
        values = np.asarray(values, dtype=object) if self.is_str else np.asarray(values, dtype=self.dtype)
        if len(values) == 0:
            return
        head = start % self.chunk
        if head:  # the chunk already holds values before `start`: keep them
            first = start - head
            values = np.concatenate([self._decode(first // self.chunk)[:head], values])
            start = first
        first_chunk = start // self.chunk
        (self.path / "c").mkdir(exist_ok=True)

        def put(i: int) -> None:
            payload = self._encode(values[i * self.chunk : (i + 1) * self.chunk])
            if i == 0 and head:  # this chunk holds committed values: replace it atomically
                replace_file(self._file(first_chunk), payload)
            else:  # only values beyond the committed ones: a torn write is overwritten on resume
                self._file(first_chunk + i).write_bytes(payload)

        list(_pool().map(put, range(-(-len(values) // self.chunk))))

    def set_length(self, length: int) -> None:
        """Declare the array's length in ``zarr.json`` (atomically); chunks beyond it are left as they are."""
        if length == self.length:
            return
        self._meta["shape"] = [int(length)]
        replace_file(self.path / "zarr.json", json.dumps(self._meta, indent=2).encode())


def read_spans(requests: list[tuple[ChunkedArray, list[tuple[int, int]], np.ndarray]], *,
               parallel: bool = True) -> None:  # fmt: skip
    """Read several arrays at once: for each ``(array, spans, out)``, the spans one after another into ``out``.

    Every chunk needed is decoded once, in parallel threads unless ``parallel=False``.
    """
    tasks = [(array, index, pieces, out) for array, spans, out in requests
             for index, pieces in array._pieces(spans).items()]  # fmt: skip
    if len(tasks) == 1 or not parallel:
        for array, index, pieces, out in tasks:
            array._fill(index, pieces, out)
    elif tasks:
        list(_pool().map(lambda task: task[0]._fill(*task[1:]), tasks))
