"""Whole-chunk reads and crash-safe appends for the store's 1-D zarr v3 arrays.

Every array of a store is an ordinary zarr v3 array (any zarr reader opens it). The store's hot
paths, ingest and the loader, touch thousands of chunks per second, where zarr's general machinery
costs about 0.2 ms per chunk; so this module reads and writes the chunk files of the store's arrays
directly, for the one layout the store creates (see ``_format``): 1-D, regular chunks, default ``/``
chunk keys, codecs ``bytes`` (little endian) + ``blosc`` for numbers and ``vlen-utf8`` + ``zstd``
for strings. Anything else is refused, and tests check that every array round-trips through zarr.

Integrity: in format 3 every chunk file ends with the crc32c of its bytes (zarr's ``crc32c``
codec), checked on every read; a chunk file that is missing, fails its checksum or does not decode is
an error naming the array and the values it holds, never zeros or the fill value.

Crash safety: a chunk file holding committed values is replaced atomically (written to a temporary
file, then renamed), so rewriting the partly filled last chunk of committed rows can never damage
them; ``zarr.json`` is replaced the same way when the length changes. With ``_format.FSYNC`` every
file written is flushed to disk, and :meth:`ChunkedArray.sync` flushes the folders, before the
manifest commits them.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from .._utils._files import fsync_folder, replace_atomically, write_file
from . import _format

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
    """Replace a chunk or ``zarr.json`` atomically (flushed to disk with ``FSYNC``; the folder by ``sync``)."""
    replace_atomically(path, payload, durable=_format.FSYNC, sync_folder=False)


class ChunkedArray:
    """One 1-D array of a store, read and appended a chunk file at a time.

    Parameters
    ----------
    path
        The array's folder (holding ``zarr.json``).
    name
        The array's name in the store (e.g. ``"labels/cell_type"``), for messages.
    dtype
        The dtype the store's layout prescribes (``"str"`` for strings); another one is refused.
    """

    _LAYOUTS = (["bytes", "blosc"], ["vlen-utf8", "zstd"], ["bytes", "blosc", "crc32c"],
                ["vlen-utf8", "zstd", "crc32c"])  # fmt: skip

    def __init__(self, path: str | Path, *, name: str | None = None, dtype: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        try:
            meta = json.loads((self.path / "zarr.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"The store array {self.name} is missing or damaged ({self.path / 'zarr.json'}: "
                             f"{err}); the store is damaged: rebuild it or restore it from a "
                             "copy.") from err  # fmt: skip
        self._meta = meta
        codecs = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
        grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
        keys = meta.get("chunk_key_encoding", {})
        if (
            len(meta.get("shape", [])) != 1
            or len(grid) != 1
            or keys.get("name") != "default"
            or keys.get("configuration", {}).get("separator", "/") != "/"
            or codecs not in self._LAYOUTS
        ):
            raise ValueError(f"The store array {self.name} has a layout this cellmint does not write ({codecs}); "
                             f"its zarr.json was modified.")  # fmt: skip
        self.chunk = int(grid[0])
        self.is_str = codecs[0] == "vlen-utf8"
        self.crc = codecs[-1] == "crc32c"
        stored = "str" if self.is_str else str(np.dtype(meta.get("data_type")))
        if dtype is not None and stored != dtype:
            raise ValueError(f"The store array {self.name} holds {stored} values, not {dtype} as cellmint writes "
                             "them: its zarr.json was modified. Restore the store from a copy or "
                             "rebuild it.")  # fmt: skip
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
        self._dirty = False

    @property
    def length(self) -> int:
        """The array's declared length (``shape[0]`` in ``zarr.json``)."""
        return int(self._meta["shape"][0])

    def _file(self, index: int) -> Path:
        return self.path / "c" / str(index)

    # -- reading ---------------------------------------------------------------------------
    def _where(self, index: int) -> str:
        return f"chunk file c/{index} of the store array {self.name} (values {index * self.chunk}:" \
               f"{(index + 1) * self.chunk})"  # fmt: skip

    def _damaged(self, index: int, problem: str) -> ValueError:
        return ValueError(f"The {self._where(index)} {problem}: the store is damaged. Store.verify() lists every "
                          "damaged array and row; rebuild the store or restore it from a copy.")  # fmt: skip

    def _decode(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``index`` (``out``: a preallocated chunk-sized buffer to decode into; it saves an allocation)."""
        try:
            raw = self._file(index).read_bytes()
        except FileNotFoundError:  # every chunk of a store is written: a missing one was lost
            raise self._damaged(index, "is missing") from None
        if self.crc:
            if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise self._damaged(index, "fails its checksum (crc32c)")
            raw = memoryview(raw)[:-4]
        try:
            if self.is_str:
                values = self._vlen.decode(self._codec.decode(raw))
            else:
                values = np.frombuffer(self._codec.decode(raw, out=out), dtype=self.dtype)
        except Exception as err:  # any codec failure means a damaged chunk file
            raise self._damaged(index, f"does not decode ({err})") from err
        if len(values) != self.chunk:
            raise self._damaged(index, f"holds {len(values)} values, not {self.chunk}")
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
            payload = self._codec.encode(self._vlen.encode(np.asarray(values, dtype=object)))
        else:
            payload = self._codec.encode(np.ascontiguousarray(values, dtype=self.dtype))
        if self.crc:
            payload = bytes(payload) + google_crc32c.value(payload).to_bytes(4, "little")
        return payload

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``values`` at ``start:start + len(values)``; values before ``start`` are kept.

        Values before ``start`` must be committed, values from ``start`` on not yet: the one chunk that
        mixes both is replaced atomically, later chunks are written in place. The declared length is not
        changed (see :meth:`set_length`).
        """
        run_writes(self.write_tasks(start, values))

    def write_tasks(self, start: int, values: np.ndarray) -> list:
        """:meth:`write` as independent tasks (one per chunk file) for :func:`run_writes`."""
        values = np.asarray(values, dtype=object) if self.is_str else np.asarray(values, dtype=self.dtype)
        if len(values) == 0:
            return []
        head = start % self.chunk
        if head:  # the chunk already holds values before `start`: keep them
            first = start - head
            values = np.concatenate([self._decode(first // self.chunk)[:head], values])
            start = first
        first_chunk = start // self.chunk
        (self.path / "c").mkdir(exist_ok=True)
        self._dirty = True

        def put(i: int) -> None:
            payload = self._encode(values[i * self.chunk : (i + 1) * self.chunk])
            if i == 0 and head:  # this chunk holds committed values: replace it atomically
                replace_file(self._file(first_chunk), payload)
            else:  # only values beyond the committed ones: a torn write is overwritten on resume
                write_file(self._file(first_chunk + i), payload, durable=_format.FSYNC)

        return [functools.partial(put, i) for i in range(-(-len(values) // self.chunk))]

    def set_length(self, length: int) -> None:
        """Declare the array's length in ``zarr.json`` (atomically); chunks beyond it are left as they are."""
        run_writes(self.length_tasks(length))

    def length_tasks(self, length: int) -> list:
        """:meth:`set_length` as a task for :func:`run_writes` (none when the length is already right)."""
        if length == self.length:
            return []
        self._meta["shape"] = [int(length)]
        self._dirty = True
        payload = json.dumps(self._meta, indent=2).encode()
        return [functools.partial(replace_file, self.path / "zarr.json", payload)]

    def sync(self) -> None:
        """Flush the folders of the files written since the last call (with ``FSYNC``): renames and new files."""
        run_writes(self.sync_tasks())

    def sync_tasks(self) -> list:
        """:meth:`sync` as tasks for :func:`run_writes`."""
        tasks = []
        if self._dirty and _format.FSYNC:
            if (self.path / "c").is_dir():
                tasks.append(functools.partial(fsync_folder, self.path / "c"))
            tasks.append(functools.partial(fsync_folder, self.path))
        self._dirty = False
        return tasks


def run_writes(tasks: list) -> None:
    """Run write tasks of one or several arrays together, in threads.

    Encoding runs in parallel, and the disk flushes of many files at once, which the file system
    commits together (one journal commit instead of one per file).
    """
    if len(tasks) == 1:
        tasks[0]()
    elif tasks:
        list(_io_pool().map(lambda task: task(), tasks))


def _io_pool() -> ThreadPoolExecutor:
    """Threads that write and flush files (more than the cores: they mostly wait for the disk)."""
    key = -os.getpid()  # one pool per process, like _pool
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(max_workers=16, thread_name_prefix="cellmint-writes")
    return _pools[key]


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
