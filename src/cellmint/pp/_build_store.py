"""``cm.pp.build_store``: many inputs → one crash-safe, resumable on-disk store of counts and labels."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._utils import _logging as logg
from .._utils._docs import doc_params
from ..store._format import MANIFEST, read_manifest
from ..store._ingest import check_inputs, ingest
from ..store._inputs import Input, gene_panel, open_input
from ..store._split import DEFAULT_SPLIT
from ..store._store import Store
from ..store._writer import StoreWriter, create


def _as_list(data: Any) -> list:
    return list(data) if isinstance(data, Sequence) and not isinstance(data, str | bytes) else [data]


def _open_existing(path: Path, inputs: list[Input], params: dict, *, resume: bool) -> StoreWriter | None:
    manifest = read_manifest(path)
    if not resume:
        raise FileExistsError(f"A store exists at {path}; pass resume=True to continue it or overwrite=True.")
    recorded = [{k: v for k, v in i.items() if k != "name"} for i in manifest["inputs"]]
    current = [{**inp.identity, "n_obs": int(inp.n_obs)} for inp in inputs]
    if recorded != current:
        changed = [
            manifest["inputs"][i]["name"] for i, (a, b) in enumerate(zip(recorded, current, strict=False)) if a != b
        ]
        raise ValueError(
            f"The inputs changed since the store at {path} was begun ({changed or 'number of inputs'}): "
            "resuming would mix data. Rebuild with overwrite=True."
        )
    if manifest["params"] != params:
        raise ValueError(f"The store at {path} was begun with other parameters ({manifest['params']}); "
                         "rebuild with overwrite=True.")  # fmt: skip
    return StoreWriter(path)


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
    resume: bool = True,
    overwrite: bool = False,
    random_state: int = 0,
    progress: bool | None = None,
) -> Store:
    """Build a crash-safe on-disk store of raw counts, labels and groups from one or many inputs.

    Inputs are read a batch of cells at a time; each batch is written, then committed atomically to
    the store's manifest, so a crash loses at most the batch being written. Calling ``build_store``
    again with the same arguments resumes after the last committed batch: nothing is lost or stored
    twice. An input that changed since the build began is refused.

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
    labels, group and ``obs_keys``; its manifest records the inputs (size and fingerprint), every
    committed batch (row range and crc32), and the parameters.
    """
    path = Path(path)
    label_keys, obs_keys = list(label_keys), list(obs_keys)
    valid = isinstance(batch_cells, int) and not isinstance(batch_cells, bool) and batch_cells >= 1
    if batch_cells is not None and not valid:
        raise ValueError(f"batch_cells must be a positive integer or None, not {batch_cells!r}.")
    inputs = [open_input(item, i) for i, item in enumerate(_as_list(data))]
    if not inputs:
        raise ValueError("No input given.")
    check_inputs(inputs, label_keys + obs_keys + ([group_key] if group_key else []))
    panel = gene_panel(inputs, genes, strip_ensembl_versions)
    params = {"layer": layer, "genes": list(map(str, panel)) if genes is not None else None,
              "label_keys": label_keys, "group_key": group_key, "obs_keys": obs_keys, "batch_cells": batch_cells,
              "strip_ensembl_versions": strip_ensembl_versions}  # fmt: skip

    start = logg.info(f"building store {path}")
    if path.exists() and overwrite:
        shutil.rmtree(path)
    if path.exists():
        if not (path / MANIFEST).is_file():
            raise FileExistsError(f"{path} exists and is not a cellmint store; pass overwrite=True to replace it.")
        writer = _open_existing(path, inputs, params, resume=resume)
        logg.info(f"    resuming after {writer.manifest['n_obs']:,} committed cells")
    else:
        writer = create(path, panel=panel, label_keys=label_keys, group_key=group_key, obs_keys=obs_keys,
                        inputs=inputs, params=params)  # fmt: skip
    ingest(writer, inputs, first_index=0, progress=progress)
    writer.finish()
    store = Store(path)
    if DEFAULT_SPLIT not in store.splits:
        with warnings.catch_warnings(record=True) as caught:  # a split nobody asked for: say it, don't warn
            warnings.simplefilter("always")
            store.make_split(DEFAULT_SPLIT, test_fraction=0.1, val_fraction=0.1, random_state=random_state)
        for warning in caught:
            logg.warning(f"default split: {warning.message}")
    logg.info(f"    finished: {store!r}", time=start)
    return store
