"""``Store.verify``: every array of a store checked against the checksums its manifest commits.

The manifest's own checksum is checked when it is read (``_format.read_manifest``); here every
committed batch is checked in every array — the CSR counts (crc32 of indptr, indices, data; gene
indices inside the panel) and each per-cell array (crc32 of its values) — plus the gene panel against
``var/names``, every split against its crc32 and its groups kept whole, and the declared lengths. Each
problem names the array, the rows (batch and input) and what is wrong; all of them are reported at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import _split
from ._format import row_arrays, values_checksum

if TYPE_CHECKING:
    from ._reader import StoreReader


def _read(store: StoreReader, name: str, start: int, stop: int, problems: list[str], where: str) -> np.ndarray | None:
    """Values ``start:stop`` of an array, or ``None`` with the reason added to ``problems``."""
    try:
        return store._array(name).read(start, stop)
    except ValueError as err:
        problems.append(f"{name} {where}: {err}")
        return None


def _lengths(store: StoreReader, problems: list[str]) -> bool:
    n, nnz = store.n_obs, store.nnz
    need = {"X/indptr": n + 1, "X/indices": nnz, "X/data": nnz}
    need |= {name: n for name in row_arrays(store.manifest)}
    ok = True
    for name, length in need.items():
        try:
            declared = store._array(name).length
        except ValueError as err:
            problems.append(str(err))
            ok = False
            continue
        if declared < length:
            problems.append(f"{name} holds {declared} values, the manifest commits {length}")
            ok = False
    return ok


def _batch_problems(store: StoreReader, indptr: np.ndarray, problems: list[str]) -> None:
    m, n = store.manifest, store.n_obs
    checksummed = m["format_version"] >= 3
    expected_rows = 0
    for i, batch in enumerate(m["batches"]):
        r0, r1 = batch["rows"]
        where = f"rows {r0}:{r1} (batch {i}, input {batch['input']})"
        if r0 != expected_rows:
            problems.append(f"batch {i} starts at row {r0}, expected {expected_rows}")
        expected_rows = r1
        lo, hi = int(indptr[r0]), int(indptr[r1])
        if [lo, hi] != batch["nnz"]:
            problems.append(f"X/indptr {where} spans values {lo}:{hi}, the manifest says {batch['nnz']}")
        else:
            indices = _read(store, "X/indices", lo, hi, problems, where)
            data = _read(store, "X/data", lo, hi, problems, where)
            if indices is not None and data is not None:
                from ._writer import batch_checksum

                if indices.size and (indices.min() < 0 or indices.max() >= store.n_vars):
                    problems.append(f"X/indices {where} has gene indices outside the panel")
                if batch_checksum(indptr[r0 : r1 + 1], indices, data) != batch["crc32"]:
                    problems.append(f"X (indptr, indices, data) {where} fails its crc32 checksum")
        if not checksummed:
            continue
        for name in row_arrays(m):
            expected = batch.get("checksums", {}).get(name)
            if expected is None:
                problems.append(f"{name} {where}: the manifest records no checksum for it")
                continue
            values = _read(store, name, r0, r1, problems, where)
            if values is not None and values_checksum(values) != expected:
                problems.append(f"{name} {where} fails its crc32 checksum")
    if expected_rows != n:
        problems.append(f"committed batches cover {expected_rows} rows, the manifest says {n}")


def _split_problems(store: StoreReader, problems: list[str]) -> None:
    splits = store.manifest.get("splits", {})
    obs = None
    for name, info in splits.items():
        array = info.get("array", f"splits/{name}")
        codes = _read(store, array, 0, info["n_obs"], problems, f"(split {name!r}, rows 0:{info['n_obs']})")
        if codes is None:
            continue
        if "crc32" in info and values_checksum(codes) != info["crc32"]:
            problems.append(f"{array} (split {name!r}, rows 0:{info['n_obs']}) fails its crc32 checksum")
            continue
        if info["group_key"] is not None:
            obs = store.obs() if obs is None else obs
            groups = obs[info["group_key"]].astype(str).to_numpy()[: info["n_obs"]]
            if leaks := _split.leakage(groups, codes):
                problems.append(f"split {name!r} puts groups in several parts: {leaks[:5]}")


def verify(store: StoreReader) -> dict:
    """See :meth:`cellmint.Store.verify`."""
    problems: list[str] = []
    m, n, nnz = store.manifest, store.n_obs, store.nnz
    if m["format_version"] >= 3:
        genes = _read(store, "var/names", 0, store.n_vars, problems, f"(genes 0:{store.n_vars})")
        if genes is not None and list(genes) != list(m["genes"]):
            first = next(i for i, (a, b) in enumerate(zip(genes, m["genes"], strict=True)) if a != b)
            problems.append(f"var/names differs from the manifest's gene panel from gene {first} on "
                            f"({genes[first]!r} instead of {m['genes'][first]!r})")  # fmt: skip
    if _lengths(store, problems):
        indptr = _read(store, "X/indptr", 0, n + 1, problems, f"(rows 0:{n})")
        if indptr is not None:
            if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
                problems.append("X/indptr does not run from 0 to nnz in increasing order")
            else:
                _batch_problems(store, indptr, problems)
        if not problems:
            _split_problems(store, problems)
    if problems:
        raise ValueError(f"The store at {store.path} is damaged ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}); rebuild it or restore it from a copy:\n- "
                         + "\n- ".join(problems))  # fmt: skip
    out = {"batches": len(m["batches"]), "cells": n, "nnz": nnz}
    if m["format_version"] < 3:
        out["note"] = (f"format {m['format_version']}: only the counts (X) carry checksums; rebuild the store to "
                       "cover labels, groups and obs too")  # fmt: skip
    return out
