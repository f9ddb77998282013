"""The on-disk layout of a cellmint store, described once, with its format version.

A store is a zarr v3 group (a folder)::

    store.zarr/
      manifest.json            the source of truth: format and package version, inputs, committed
                               batches (row ranges, nnz, crc32), label categories, gene panel, state
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

Every array is 1-D, in regular chunks; numbers are compressed with blosc-lz4 and byte shuffling
(about 3.5× smaller on counts, decoded at GB/s), strings with zstd. ``_arrays`` reads and writes
their chunk files directly; any zarr v3 reader opens them too.

Crash safety: a batch is written *beyond* the committed rows, then committed by atomically
replacing ``manifest.json`` (write a temporary file, fsync, rename). Chunk files and ``zarr.json``
files are replaced atomically too, so rewriting the partly filled last chunk never damages
committed values. Arrays may hold uncommitted values past the committed length after a crash;
readers trust only the manifest, and a resumed build overwrites them. Each batch's checksum
(crc32 of its CSR arrays) lets ``Store.verify`` find damage done afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._utils._files import read_manifest_file, replace_atomically

FORMAT_VERSION = 2  # 2: blosc-lz4 chunks written by ``_arrays``, crc32 batch checksums
MANIFEST = "manifest.json"
#: values per zarr chunk of X/data and X/indices (~0.5 MiB): about one block of 256 cells per read.
#: Unsharded: on a 2-core machine sharding cost the loader a third of its speed (measured).
DATA_CHUNK = 1 << 17
ROW_CHUNK = 1 << 16


def numeric_codec():
    """The compressor of every numeric array (blosc-lz4, byte shuffle)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at ``path`` (a clear error when it is missing or damaged)."""
    manifest = read_manifest_file(path, MANIFEST, what="store", noun="store")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"The store at {path} has format version {version}, written by cellmint "
            f"{manifest.get('cellmint_version', '?')}; this cellmint reads version {FORMAT_VERSION}. Upgrade cellmint."
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"The store at {path} has format version {version!r}, which this cellmint no longer reads "
            f"(it reads version {FORMAT_VERSION}); rebuild it with cm.pp.build_store(..., overwrite=True)."
        )
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically and durably replace the manifest: a reader sees the old one or the new one, never half of one."""
    replace_atomically(Path(path) / MANIFEST, json.dumps(manifest, indent=1).encode())
