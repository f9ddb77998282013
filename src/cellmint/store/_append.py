"""``Store.append`` and ``Store.rollback``: more inputs into a finished store, and undoing an unfinished append.

An append records, before its first batch, how to undo it (``manifest["append"]``: the committed
cells, counts, inputs, batches and categories before it), marks the store ``building``, and commits
its inputs batch by batch like a build. If it fails (a bad value, a crash), the store keeps the
batches committed so far; calling ``append`` again with the same inputs — or with an input fixed
*after* the rows already committed from it — resumes, and ``rollback`` returns the store to its
state before the append. Both run under the store's writer lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ._format import ROW_CHUNK, write_manifest

if TYPE_CHECKING:
    from ._store import Store

#: what the manifest records to undo an append: fields restored as they were before it
_UNDO_FIELDS = ("n_obs", "nnz", "labels", "groups", "obs_table")


def store_names(store: Store, stop: int):
    """The store's cell names of rows ``0:stop``, a chunk at a time."""
    for start in range(0, stop, ROW_CHUNK):
        yield store._array("obs/names").read(start, min(stop, start + ROW_CHUNK))


def check_new_inputs(inputs: list, records: list[dict], existing, *, allow_duplicates: bool) -> None:
    """Refuse an input given twice or already in the store, and cell names found twice (unless allowed)."""
    from ._inputs import duplicate_names, repeated_input

    if allow_duplicates:
        return
    if repeated := repeated_input(inputs, records):
        inp, other = repeated
        same = "file content" if inp.identity.get("path") else "cell and gene names, same shape"
        raise ValueError(f"{inp.name} is the same input as {other} ({same}), already given: its cells would be stored "
                         "twice. Remove it, or pass allow_duplicates=True to store them again.")  # fmt: skip
    if clash := duplicate_names(inputs, existing):
        examples, where = clash
        raise ValueError(f"Cell names occur twice ({where}), e.g. {examples}: the store's obs index would not be "
                         "unique. Make them unique (e.g. prefix each input's names with its sample), or pass "
                         "allow_duplicates=True to keep them (Store.obs() then suffixes the input's "
                         "number).")  # fmt: skip


def append(store: Store, data: Any, *, missing_genes: str | None, allow_duplicates: bool,
           progress: bool | None) -> None:  # fmt: skip
    """See :meth:`cellmint.Store.append` (called holding the store's lock, with a current manifest)."""
    from ._inputs import close_inputs, open_input
    from ._writer import StoreWriter

    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError("No input given to append.")
    writer = StoreWriter(store.path)
    m = writer.manifest
    if m["state"] != "complete" and "append" not in m:
        raise ValueError(f"The build of the store at {store.path} is unfinished ({m['n_obs']:,} cells committed): "
                         "resume it by calling cm.pp.build_store with the same arguments before "
                         "appending.")  # fmt: skip
    resuming = m["state"] != "complete"
    first = m["append"]["n_inputs"] if resuming else len(m["inputs"])
    params = m["params"]
    mode = params.get("missing_genes", "error") if missing_genes is None else missing_genes
    inputs = []
    try:
        for i, item in enumerate(items):
            inputs.append(open_input(item, first + i))
        _append(store, writer, inputs, first=first, resuming=resuming, mode=mode, allow_duplicates=allow_duplicates,
                progress=progress)  # fmt: skip
    finally:
        close_inputs(inputs)


def _append(store: Store, writer, inputs: list, *, first: int, resuming: bool, mode: str, allow_duplicates: bool,
            progress: bool | None) -> None:  # fmt: skip
    from ._ingest import check_inputs, committed_rows_problem, ingest
    from ._inputs import check_missing_genes, missing_panel_genes
    from ._writer import identity_of, input_record

    m, params = writer.manifest, writer.manifest["params"]
    group = [params["group_key"]] if params["group_key"] else []
    check_inputs(inputs, params["label_keys"] + params["obs_keys"] + group)
    missing = missing_panel_genes(inputs, pd.Index(m["genes"]), params["strip_ensembl_versions"])
    check_missing_genes(inputs, missing, mode)
    rows_before = m["append"]["n_obs"] if resuming else m["n_obs"]
    check_new_inputs(inputs, m["inputs"][:first], store_names(store, rows_before),
                     allow_duplicates=allow_duplicates)  # fmt: skip
    records = [input_record(inp, first + i, genes) for i, (inp, genes) in enumerate(zip(inputs, missing, strict=True))]
    if resuming:
        pending = m["inputs"][first:]
        if len(pending) != len(records):
            raise ValueError(f"The store at {store.path} has an unfinished append of {len(pending)} other input(s) "
                             f"({[r['name'] for r in pending]}): append those again to resume it, or call "
                             "store.rollback() to undo it.")  # fmt: skip
        changed = [i for i, (old, new) in enumerate(zip(pending, records, strict=True))
                   if identity_of(old) != identity_of(new)]  # fmt: skip
        for i in changed:
            if problem := committed_rows_problem(writer, inputs[i], first + i):
                raise ValueError(f"{inputs[i].name} is not the input of the unfinished append ({pending[i]['name']}): "
                                 f"{problem}. Append that input to resume, or call store.rollback() to undo the "
                                 "unfinished append.")  # fmt: skip
            m["inputs"][first + i] = records[i]  # the same committed rows: the fixed input takes over
        if changed:
            write_manifest(store.path, m)
    else:
        m["append"] = {"n_inputs": len(m["inputs"]), "n_batches": len(m["batches"]),
                       **{key: m[key] for key in _UNDO_FIELDS}}  # fmt: skip
        m["inputs"] += records
        m["state"] = "building"
        write_manifest(store.path, m)
    try:
        ingest(writer, inputs, first_index=first, progress=progress)
    except Exception as err:
        done = writer.manifest["n_obs"] - m["append"]["n_obs"]
        err.add_note(f"The append stopped after {done:,} committed cells, which the store keeps (state: building). "
                     "Fix the input and call append again to resume, or call Store.rollback() to undo the "
                     "append.")  # fmt: skip
        raise
    writer.finish()


def rollback(store: Store) -> None:
    """See :meth:`cellmint.Store.rollback` (called holding the store's lock, with a current manifest)."""
    m = store.manifest
    if m["state"] == "complete":
        raise ValueError(f"The store at {store.path} is complete: there is no unfinished append to roll back.")
    if "append" not in m:
        raise ValueError(f"The store at {store.path} is an unfinished build, with no finished state to return to: "
                         "resume it by calling cm.pp.build_store with the same arguments, or rebuild it with "
                         "overwrite=True.")  # fmt: skip
    undo = m.pop("append")
    del m["inputs"][undo["n_inputs"] :]
    del m["batches"][undo["n_batches"] :]
    m.update({key: undo[key] for key in _UNDO_FIELDS})
    m["state"] = "complete"
    write_manifest(store.path, m)  # the values beyond the committed rows are overwritten by the next append
