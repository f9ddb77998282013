"""The on-disk layout of a cellmint store, described once, with its format version.

A store is a zarr v3 group (a folder)::

    store.zarr/
      manifest.json            the source of truth: format and package version, inputs, committed
                               batches (row ranges, nnz, checksums), label categories, gene panel,
                               state, generation, its own sha256
      X/indptr   int64         CSR counts of the committed cells over the gene panel
      X/indices  int32
      X/data     float32
      obs/names  str           cell names as in the inputs (obs/input tells inputs apart)
      obs/library_size float64 total counts of each cell over *all* genes of its input
      obs/n_genes int32        genes detected in each cell over all genes of its input
      obs/input  int32         index of the input each cell came from
      labels/<key> int32       label codes (categories in the manifest); -1 = missing
      groups     int32         group codes (e.g. donors; categories in the manifest)
      obs_table/<key>          extra obs columns: float64, or int32 codes for categorical/str
      var/names  str           the gene panel, in order
      splits/<name> int8       part of every cell in a split: 0 train, 1 val, 2 test
      .cellmint.lock           the writers' lock file (empty unless a writer holds it)

Every array is 1-D, in regular chunks; numbers are compressed with blosc-lz4 and byte shuffling
(about 3.5× smaller on counts, decoded at GB/s), strings with zstd. ``_arrays`` reads and writes
their chunk files directly; any zarr v3 reader opens them too.

Integrity: every chunk file ends with the crc32c of its bytes (zarr's ``crc32c`` codec), checked on
every read, and a missing chunk file is an error, never the fill value. Each committed batch records
the crc32 of its CSR rows and of its values in every per-cell array; each split, the crc32 of its
codes; the manifest lists the gene panel (checked against ``var/names``) and carries the sha256 of
its own content (``manifest_sha256``), checked whenever it is read. ``Store.verify`` checks all of it
and names the array and rows of any damage.

Crash safety: a batch is written *beyond* the committed rows, flushed to disk (every chunk file and
folder it touched: ``fsync``), then committed by atomically replacing ``manifest.json`` (write a
temporary file, fsync, rename, fsync the folder). Chunk files and ``zarr.json`` files holding
committed values are replaced atomically too, so rewriting the partly filled last chunk never damages
committed values. Arrays may hold uncommitted values past the committed length after a crash;
readers trust only the manifest, and a resumed build overwrites them.

One writer at a time: writers hold the store's lock (``.cellmint.lock`` in the store, see
``_utils._lock``), and every manifest carries a ``generation`` that each commit increments; a commit
whose manifest is not the one on disk any more (a stale handle) is refused (compare-and-swap).

Format versions: 2 (no chunk or manifest checksums; read, never written), 3 (this layout).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._utils._files import check_sealed, manifest_bytes, parse_manifest, replace_atomically

FORMAT_VERSION = 3  # 2: blosc-lz4 chunks, crc32 of X per batch; 3: + crc32c per chunk, checksums of every array
#: older formats this cellmint still reads (but does not write to)
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
LOCK = ".cellmint.lock"
#: values per zarr chunk of X/data and X/indices (~0.5 MiB): about one block of 256 cells per read.
#: Unsharded: on a 2-core machine sharding cost the loader a third of its speed (measured).
DATA_CHUNK = 1 << 17
ROW_CHUNK = 1 << 16
#: flush chunk files and folders to disk before each manifest commit (power-loss safety); the store
#: benchmark turns it off to measure its cost
FSYNC = True


class StaleManifestError(RuntimeError):
    """A write based on a manifest that another writer has replaced since (compare-and-swap failed)."""


def numeric_codec():
    """The byte codecs of every numeric array: blosc-lz4 with byte shuffle, then a crc32c of the chunk."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())


def string_codec():
    """The byte codecs of every string array: zstd, then a crc32c of the chunk."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=0), Crc32cCodec())


@dataclass(frozen=True)
class ArrayKind:
    """What a store array holds: its dtype (``"str"`` for strings) and whether it has one value per cell."""

    dtype: str
    per_cell: bool = True


def array_kind(name: str, manifest: dict) -> ArrayKind:
    """The layout ``_format`` prescribes for the store array ``name`` (e.g. ``"labels/cell_type"``)."""
    fixed = {"X/indptr": ArrayKind("int64", False), "X/indices": ArrayKind("int32", False),
             "X/data": ArrayKind("float32", False), "obs/names": ArrayKind("str"),
             "obs/library_size": ArrayKind("float64"), "obs/n_genes": ArrayKind("int32"),
             "obs/input": ArrayKind("int32"), "groups": ArrayKind("int32"),
             "var/names": ArrayKind("str", False)}  # fmt: skip
    if name in fixed:
        return fixed[name]
    folder, _, key = name.partition("/")
    if folder == "labels":
        return ArrayKind("int32")
    if folder == "splits":
        return ArrayKind("int8")
    if folder == "obs_table":
        return ArrayKind("int32" if key in manifest.get("obs_table", {}) else "float64")
    raise KeyError(f"{name!r} is not an array of a cellmint store.")


def row_arrays(manifest: dict) -> list[str]:
    """Names of the arrays with one value per cell (besides X), as the manifest declares them."""
    names = ["obs/names", "obs/library_size", "obs/n_genes", "obs/input"]
    names += [f"labels/{k}" for k in manifest["label_keys"]] + [f"obs_table/{k}" for k in manifest["obs_keys"]]
    return names + (["groups"] if manifest["group_key"] is not None else [])


def values_checksum(values: np.ndarray) -> int:
    """crc32 of an array's values.

    Numbers: their little-endian bytes; strings: each one's UTF-8 bytes preceded by their length
    (4 bytes, little endian).
    """
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        crc = 0
        for value in values:
            encoded = str(value).encode()
            crc = zlib.crc32(len(encoded).to_bytes(4, "little") + encoded, crc)
        return crc
    return zlib.crc32(memoryview(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))).cast("B"))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path``, its checksum and format version checked (clear errors)."""
    path = Path(path)
    file = path / MANIFEST
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a cellmint store (a folder holding {MANIFEST}).")
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a cellmint store: {MANIFEST} is missing.")
    manifest = parse_manifest(file.read_bytes(), f"the store at {path}", check_seal=False)
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"The store at {path} has format version {version}, written by cellmint "
            f"{manifest.get('cellmint_version', '?')}; this cellmint reads version {FORMAT_VERSION}. Upgrade cellmint."
        )
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"The store at {path} has format version {version!r}, which this cellmint no longer reads "
            f"(it reads versions {READABLE_VERSIONS}); rebuild it with cm.pp.build_store(..., overwrite=True)."
        )
    check_sealed(manifest, f"the store at {path}")
    if version >= 3 and "manifest_sha256" not in manifest:
        raise ValueError(f"The manifest of the store at {path} lacks its checksum (manifest_sha256), which format "
                         f"{version} always writes: it was edited. Restore it from a copy or rebuild the "
                         "store.")  # fmt: skip
    return manifest


def require_writable(manifest: dict, path: str | Path) -> None:
    """Refuse to write to a store of an older format (it lacks the checksums this cellmint keeps)."""
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"The store at {path} has format version {manifest['format_version']}, which this cellmint reads but "
            f"no longer writes (version {FORMAT_VERSION} adds checksums of every array). Rebuild it with "
            "cm.pp.build_store(..., overwrite=True) to append to it or make splits."
        )


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Commit ``manifest``: atomically and durably, and only if the manifest on disk is the one it came from.

    The manifest's ``generation`` must equal the one on disk (compare-and-swap: a stale handle never
    overwrites a newer commit; call it holding the store's lock); it is incremented and the manifest
    sealed (``manifest_sha256``), then written to a temporary file, flushed, and renamed into place.
    """
    path = Path(path)
    expected = manifest.get("generation", 0)
    if (path / MANIFEST).is_file():
        current = read_manifest(path).get("generation", 0)
        if current != expected:
            raise StaleManifestError(
                f"The store at {path} was changed by another writer (its manifest is at generation {current}, "
                f"this one was read at {expected}); nothing was written. Open the store again and retry."
            )
    manifest["generation"] = expected + 1
    replace_atomically(path / MANIFEST, manifest_bytes(manifest))
