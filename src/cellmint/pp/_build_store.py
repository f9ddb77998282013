"""``cm.pp.build_store``: many inputs → one crash-safe, resumable on-disk store of counts and labels."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._utils import _logging as logg
from .._utils._docs import doc_params
from .._utils._lock import writer_lock
from .._utils._resources import ResourceMonitor
from ..store._append import check_new_inputs
from ..store._format import LOCK, MANIFEST, read_manifest, write_manifest
from ..store._ingest import check_inputs, committed_rows_problem, ingest
from ..store._inputs import (
    Input,
    check_missing_genes,
    close_inputs,
    gene_panel,
    missing_panel_genes,
    open_input,
)
from ..store._split import DEFAULT_FRACTIONS, DEFAULT_SPLIT
from ..store._store import Store
from ..store._writer import StoreWriter, create, identity_of, input_record


def _as_list(data: Any) -> list:
    return list(data) if isinstance(data, Sequence) and not isinstance(data, str | bytes) else [data]


def _keys(value: Any, name: str) -> list[str]:
    """A list of obs column names from a string (one column) or a sequence of strings."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a column name or a list of column names, not {value!r}.")
    return list(value)


def _open_existing(path: Path, inputs: list[Input], params: dict, missing: list[list[str]], *,
                   resume: bool) -> StoreWriter:  # fmt: skip
    """A writer resuming the store at ``path``, after checking it was begun with these inputs and parameters.

    An input that changed since (a file fixed after a failed build) is accepted when it reproduces
    every row already committed from it; its record is then updated.
    """
    manifest = read_manifest(path)
    if not resume:
        raise FileExistsError(f"A store exists at {path}; pass resume=True to continue it or overwrite=True.")
    recorded = [identity_of(record) for record in manifest["inputs"]]
    current = [identity_of(input_record(inp, i, [])) for i, inp in enumerate(inputs)]
    if len(recorded) != len(current):
        raise ValueError(f"The inputs changed since the store at {path} was begun ({len(recorded)} inputs then, "
                         f"{len(current)} now): resuming would mix data. Rebuild with overwrite=True, or add "
                         "inputs to a finished store with Store.append.")  # fmt: skip
    if manifest["params"] != params:
        changed = sorted(k for k in params if manifest["params"].get(k) != params[k])
        raise ValueError(f"The store at {path} was begun with other parameters ({changed}: "
                         f"{ {k: manifest['params'].get(k) for k in changed} }); pass the same ones to resume, or "
                         "rebuild with overwrite=True.")  # fmt: skip
    writer = StoreWriter(path)
    changed = [i for i, (a, b) in enumerate(zip(recorded, current, strict=True)) if a != b]
    for i in changed:
        if problem := committed_rows_problem(writer, inputs[i], i):
            raise ValueError(f"The inputs changed since the store at {path} was begun ({inputs[i].name}: {problem}): "
                             "resuming would mix data. Rebuild with overwrite=True.")  # fmt: skip
        writer.manifest["inputs"][i] = input_record(inputs[i], i, missing[i])
    if changed:
        write_manifest(path, writer.manifest)
        logg.info(f"    {len(changed)} input(s) changed after the rows already committed from them: resuming")
    return writer


def _clear(path: Path) -> None:
    """Delete everything in the store folder ``path`` but its lock file (which the caller holds)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name == LOCK:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as entries:
        return all(entry.name == LOCK for entry in entries)


@doc_params()
def build_store(
    data: Any,
    path: str | Path,
    *,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    label_keys: Sequence[str] = (),
    group_key: str | None = None,
    obs_keys: Sequence[str] = (),
    batch_cells: int | None = None,
    strip_ensembl_versions: bool = False,
    missing_genes: str = "error",
    allow_duplicates: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    random_state: int = 0,
    progress: bool | None = None,
) -> Store:
    """Build a crash-safe on-disk store of raw counts, labels and groups from one or many inputs.

    Inputs are read a batch of cells at a time; each batch is written and flushed to disk, then
    committed atomically to the store's manifest, so a crash (or a power loss) loses at most the batch
    being written. Calling ``build_store`` again with the same arguments resumes after the last
    committed batch: nothing is lost or stored twice. An input that changed since the build began is
    refused, unless it reproduces every row already committed from it (an input fixed after a bad
    value stopped the build). One process builds a store at a time: a second one gets an error.

    Parameters
    ----------
    data
        An AnnData (in memory or backed), a path (``.h5ad``, ``.zarr``, 10x ``.h5``, 10x mtx folder),
        or a list mixing them.
    path
        Folder of the store (``.zarr`` by convention).
    {doc_layer} Raw counts are required (non-negative integers).
    genes
        The gene panel: ``None`` (every input has the same genes), an ordered list of gene names,
        ``"intersection"``, ``"union"`` (genes missing from an input are zero there), or the name of
        a boolean ``var`` column of the first input (e.g. ``"highly_variable"``).
    missing_genes
        Panel genes an input lacks (a ``genes`` list or ``var`` column naming genes not in every input):
        ``"error"`` refuses and lists them; ``"zero"`` stores zero counts for them. ``genes="union"``
        implies ``"zero"``. The genes each input lacks are recorded in the manifest.
    allow_duplicates
        Store cells whose names occur twice (within an input or across inputs) and an input given
        twice; by default these are refused. ``Store.obs()`` suffixes duplicated names with the input's
        number.
    label_keys
        ``obs`` columns of cell labels (several levels allowed); stored as codes with categories.
    group_key
        ``obs`` column of groups kept whole by splits (e.g. donor).
    obs_keys
        Further ``obs`` columns to keep (numbers as float64, anything else as categories).
    batch_cells
        Cells per committed batch; ``None`` picks about 256 MiB of stored values per batch (e.g. ~20,000
        cells of 1,000 detected genes). Memory peaks near four batches: the one read ahead, the one being
        checked, and the one being compressed and written.
    strip_ensembl_versions
        Match genes without Ensembl version suffixes (``ENSG00000141510.16`` → ``ENSG00000141510``).
    resume
        Continue an interrupted build at ``path`` (the default); ``False`` refuses an existing store.
    overwrite
        Delete whatever is at ``path`` first.
    random_state
        Seed of the store's ``"default"`` split, made when the build finishes: 80% train, 10% validation,
        10% test, groups kept whole and label proportions matched (see :meth:`Store.make_split`). Make
        other splits, or replace this one, with :meth:`Store.make_split`.
    {doc_progress}

    Returns
    -------
    The :class:`cellmint.Store`. Per cell it holds the counts over the panel, ``library_size`` and
    ``n_genes`` computed over **all** genes of the cell's input (before the panel is applied), the
    labels, group and ``obs_keys``; its manifest records the inputs (size, fingerprint, missing
    genes), every committed batch (row range and the crc32 of every array), the parameters, and
    ``build_resources``: what the build that completed the store cost (``wall_time_s``, ``n_cells``
    added, ``cells_per_s``, ``peak_rss_bytes``, ``peak_rss_scope``, ``device``; also logged).
    """
    path = Path(path)
    label_keys, obs_keys = _keys(label_keys, "label_keys"), _keys(obs_keys, "obs_keys")
    if group_key is not None and not isinstance(group_key, str):
        raise TypeError(f"group_key must be one obs column name, not {group_key!r}.")
    valid = isinstance(batch_cells, int) and not isinstance(batch_cells, bool) and batch_cells >= 1
    if batch_cells is not None and not valid:
        raise ValueError(f"batch_cells must be a positive integer or None, not {batch_cells!r}.")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a store is a folder. Choose another path.")
    inputs = []
    try:
        for i, item in enumerate(_as_list(data)):
            inputs.append(open_input(item, i))
        return _build(inputs, path, layer=layer, genes=genes, label_keys=label_keys, group_key=group_key,
                      obs_keys=obs_keys, batch_cells=batch_cells, strip_ensembl_versions=strip_ensembl_versions,
                      missing_genes=missing_genes, allow_duplicates=allow_duplicates, resume=resume,
                      overwrite=overwrite, random_state=random_state, progress=progress)  # fmt: skip
    finally:
        close_inputs(inputs)


def _build(inputs: list[Input], path: Path, *, layer, genes, label_keys, group_key, obs_keys, batch_cells,
           strip_ensembl_versions, missing_genes, allow_duplicates, resume, overwrite, random_state,
           progress) -> Store:  # fmt: skip
    if not inputs:
        raise ValueError("No input given.")
    check_inputs(inputs, label_keys + obs_keys + ([group_key] if group_key else []))
    panel = gene_panel(inputs, genes, strip_ensembl_versions)
    missing = missing_panel_genes(inputs, panel, strip_ensembl_versions)
    union = isinstance(genes, str) and genes == "union"
    check_missing_genes(inputs, missing, missing_genes, allowed=union)
    check_new_inputs(inputs, [], (), allow_duplicates=allow_duplicates)
    params = {"layer": layer, "genes": list(map(str, panel)) if genes is not None else None,
              "label_keys": label_keys, "group_key": group_key, "obs_keys": obs_keys, "batch_cells": batch_cells,
              "strip_ensembl_versions": strip_ensembl_versions, "missing_genes": "zero" if union else missing_genes,
              "allow_duplicates": allow_duplicates}  # fmt: skip

    start = logg.info(f"building store {path}")
    monitor = ResourceMonitor().start()
    ours = (path / MANIFEST).is_file() or (path / LOCK).is_file()  # a store, or one being created
    if path.exists() and not overwrite and not ours and not _is_empty(path):
        raise FileExistsError(f"{path} exists and is not a cellmint store; pass overwrite=True to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    with writer_lock(path / LOCK, what=f"the store at {path}"):
        if overwrite:
            _clear(path)
        if (path / MANIFEST).is_file():
            writer = _open_existing(path, inputs, params, missing, resume=resume)
            logg.info(f"    resuming after {writer.manifest['n_obs']:,} committed cells")
        else:
            _clear(path)  # what a build that stopped before its first commit left (we hold its lock now)
            writer = create(path, panel=panel, label_keys=label_keys, group_key=group_key, obs_keys=obs_keys,
                            inputs=inputs, params=params, missing=missing)  # fmt: skip
        first_rows = writer.manifest["n_obs"]
        try:
            ingest(writer, inputs, first_index=0, progress=progress)
        except Exception as err:
            err.add_note(f"The build stopped after {writer.manifest['n_obs']:,} committed cells, which the store at "
                         f"{path} keeps: fix the input and call build_store again with the same arguments to "
                         "resume (rows already committed must stay the same), or rebuild with "
                         "overwrite=True.")  # fmt: skip
            raise
        if writer.manifest["state"] != "complete":
            monitor.n_cells = writer.manifest["n_obs"] - first_rows
            # what this build (or its resumption) cost, kept with the store: wall time, cells/s, peak RSS
            writer.manifest["build_resources"] = monitor.stop().to_dict()
            writer.finish()
        store = Store(path)
        if DEFAULT_SPLIT not in store.splits:
            with warnings.catch_warnings(record=True) as caught:  # a split nobody asked for: say it, don't warn
                warnings.simplefilter("always")
                store.make_split(DEFAULT_SPLIT, **DEFAULT_FRACTIONS, random_state=random_state)
            for warning in caught:
                logg.warning(f"default split: {warning.message}")
    report = monitor.report or monitor.stop()
    logg.info(f"    finished: {store!r}; {report}", time=start)
    return store
