"""Every byte of a store is covered: tampered manifests and chunk files are refused on open, verify or read;
failed builds and appends resume after a fix or roll back; older stores stay readable."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

import cellmint as cm
from cellmint._utils import _files
from cellmint.store import _writer

DATA = Path(__file__).parent / "_data"


def sample(n_obs=300, n_vars=40, seed=0, prefix="c"):
    adata = cm.datasets.synthetic(n_obs, n_vars, n_donors=4, random_state=seed, progress=False)
    adata.obs_names = [f"{prefix}{i}" for i in range(n_obs)]
    adata.obs["depth"] = np.arange(n_obs, dtype=float)
    return adata


def build(data, path, **kwargs):
    defaults = {"label_keys": ["cell_type", "cell_subtype"], "group_key": "donor", "obs_keys": ["batch", "depth"],
                "batch_cells": 64, "progress": False}  # fmt: skip
    return cm.pp.build_store(data, path, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished store with every kind of array (X, obs, labels, groups, obs_table, var, a split)."""
    path = tmp_path_factory.mktemp("pristine") / "s.zarr"
    build(sample(), path)
    return path


@pytest.fixture
def store_path(pristine, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(pristine, path)
    return path


def _leaves(value, path=()):
    """Every leaf of a JSON document, as (path, value)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path, value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return "x"
    return [*value, 1] if isinstance(value, list) else {**value, "x": 1}


def _set(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def test_every_field_of_the_store_manifest_changed_is_refused_on_open(store_path):
    file = store_path / "manifest.json"
    original = json.loads(file.read_text())
    leaves = list(_leaves(original))
    assert len(leaves) > 150  # batches, checksums, categories, genes, inputs, params, splits ...
    for path, value in leaves:
        edited = copy.deepcopy(original)
        _set(edited, path, _changed(value))
        file.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match="refused: its content does not match its checksum|format version"):
            cm.Store(store_path)
    for key in original:  # and every field removed
        file.write_text(json.dumps({k: v for k, v in original.items() if k != key}))
        with pytest.raises(ValueError, match="refused|lacks its checksum|format version"):
            cm.Store(store_path)
    file.write_text(json.dumps(original))
    assert cm.Store(store_path).verify()["cells"] == 300


def test_swapped_label_categories_or_reversed_genes_are_refused(store_path):
    """Two of the silent failures of the issue: both now refused on open."""
    file = store_path / "manifest.json"
    original = json.loads(file.read_text())
    swapped = copy.deepcopy(original)
    swapped["labels"]["cell_type"][:2] = swapped["labels"]["cell_type"][1::-1]
    file.write_text(json.dumps(swapped))
    with pytest.raises(ValueError, match="manifest of the store at .* is refused"):
        cm.Store(store_path)
    reversed_genes = copy.deepcopy(original)
    reversed_genes["genes"] = reversed_genes["genes"][::-1]
    file.write_text(json.dumps(reversed_genes))
    with pytest.raises(ValueError, match="manifest of the store at .* is refused"):
        cm.Store(store_path)
    # a manifest edited *and* resealed (a deliberate forgery): the gene panel no longer matches var/names
    file.write_bytes(_files.manifest_bytes(reversed_genes))
    with pytest.raises(ValueError, match="var/names differs from the manifest's gene panel from gene 0"):
        cm.Store(store_path).verify()


ARRAYS = ["X/indptr", "X/indices", "X/data", "obs/names", "obs/library_size", "obs/n_genes", "obs/input",
          "labels/cell_type", "labels/cell_subtype", "groups", "obs_table/batch", "obs_table/depth", "var/names",
          "splits"]  # fmt: skip


def _read_everything(store: cm.Store) -> None:
    """What users read: counts, per-cell table, labels, groups, splits, and batches from the loader."""
    store.read_rows(0, store.n_obs)
    store.obs()
    store.split_codes("default")
    for batch in store.loader(64, split=None, shuffle=False):
        assert batch["X"].shape[0] > 0


@pytest.mark.parametrize("damage", ["delete", "flip"])
@pytest.mark.parametrize("name", ARRAYS)
def test_a_deleted_or_flipped_chunk_of_any_array_is_caught(store_path, name, damage):
    store = cm.Store(store_path)
    array = store.manifest["splits"]["default"]["array"] if name == "splits" else name
    chunk = store_path / array / "c" / "0"
    if damage == "delete":
        chunk.unlink()
        what = "is missing"
    else:
        payload = bytearray(chunk.read_bytes())
        payload[len(payload) // 3] ^= 0x10  # one bit
        chunk.write_bytes(bytes(payload))
        what = "fails its checksum"
    store = cm.Store(store_path)  # the manifest is intact: opening works
    with pytest.raises(ValueError, match=rf"{array} .*chunk file c/0 of the store array {array} .*{what}"):
        store.verify()
    if name != "var/names":  # the gene panel is read from the (sealed) manifest; verify compares var/names to it
        with pytest.raises(ValueError, match=rf"chunk file c/0 of the store array {array} .*{what}"):
            _read_everything(store)


def test_a_changed_zarr_json_is_refused(store_path):
    meta_file = store_path / "labels" / "cell_type" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["data_type"] = "float32"
    meta_file.write_text(json.dumps(meta))
    store = cm.Store(store_path)
    with pytest.raises(ValueError, match="labels/cell_type holds float32 values, not int32"):
        store.labels  # noqa: B018
    with pytest.raises(ValueError, match="labels/cell_type holds float32 values"):
        store.verify()


def test_verify_names_the_array_and_rows_of_changed_values(store_path):
    store = cm.Store(store_path)
    batch = store.manifest["batches"][2]
    r0, r1 = batch["rows"]
    # rewrite rows of batch 2 of the labels with other (valid) values, as a buggy tool might
    array = store._array("labels/cell_subtype")
    values = array.read(0, store.n_obs)
    values[r0] = (values[r0] + 1) % len(store.manifest["labels"]["cell_subtype"])
    array.write(0, values)
    with pytest.raises(ValueError, match=rf"labels/cell_subtype rows {r0}:{r1} \(batch 2, input 0\) fails its crc32"):
        cm.Store(store_path).verify()


def test_a_format_2_store_is_still_read_but_not_written(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(DATA / "store_v2.zarr", path)
    store = cm.Store(path)
    assert store.manifest["format_version"] == 2
    X = store.read_rows(0, store.n_obs)
    assert (store.n_obs, X.nnz, X.sum()) == (120, 2100, 230009)
    assert list(store.obs().index[:3]) == ["c0", "c1", "c2"]
    assert store.verify()["note"].startswith("format 2: only the counts (X) carry checksums")
    assert len(list(store.loader(32))) > 0
    with pytest.raises(ValueError, match="format version 2, which this cellmint reads but no longer writes"):
        store.make_split("mine")
    with pytest.raises(ValueError, match="no longer writes"):
        store.append(sample(10, 20, prefix="new"))


def test_missing_panel_genes_are_an_error_unless_zero_is_asked_for(tmp_path):
    adata = sample(100, 30)
    panel = [*adata.var_names[:5], "NOT_A_GENE", "ALSO_MISSING"]
    with pytest.raises(ValueError, match=r"adata\[0\] lacks 2: \['NOT_A_GENE', 'ALSO_MISSING'\].*missing_genes='zero'"):
        build(adata, tmp_path / "a.zarr", genes=panel)
    assert not (tmp_path / "a.zarr").exists()  # refused before anything was written
    store = build(adata, tmp_path / "b.zarr", genes=panel, missing_genes="zero")
    assert store.manifest["inputs"][0]["missing_genes"] == ["NOT_A_GENE", "ALSO_MISSING"]
    assert store.manifest["params"]["missing_genes"] == "zero"
    assert store.read_rows(0, 100)[:, 5:].nnz == 0
    # appending follows the store's choice; a store built with "error" refuses an input lacking genes
    strict = build(adata, tmp_path / "c.zarr", genes=list(adata.var_names[:10]))
    lacking = sample(50, 30, seed=1, prefix="l")[:, 3:].copy()
    with pytest.raises(ValueError, match=r"lacks 3: \['gene_00000', 'gene_00001', 'gene_00002'\]"):
        strict.append(lacking)
    strict.append(lacking, missing_genes="zero")
    assert strict.manifest["inputs"][1]["missing_genes"] == ["gene_00000", "gene_00001", "gene_00002"]
    strict.verify()


def test_duplicate_cells_and_repeated_inputs_are_refused_unless_allowed(tmp_path):
    adata = sample(100, 30)
    with pytest.raises(ValueError, match=r"adata\[1\] is the same input as adata\[0\].*allow_duplicates=True"):
        build([adata, adata], tmp_path / "a.zarr")
    twin = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata may warn about the duplicate, which is the point
        twin.obs_names = [*adata.obs_names[:99], adata.obs_names[0]]
    with pytest.raises(ValueError, match=r"Cell names occur twice \(in adata\[0\]\), e.g. \['c0'\]"):
        build(twin, tmp_path / "b.zarr")
    store = build(adata, tmp_path / "c.zarr")
    with pytest.raises(ValueError, match=r"adata\[1\] is the same input as adata\[0\]"):
        store.append(adata)
    overlapping = sample(50, 30, seed=3, prefix="c")  # c0..c49 are in the store already
    with pytest.raises(ValueError, match=r"Cell names occur twice \(in the store already\), e.g. \['c0', 'c1'"):
        store.append(overlapping)
    assert cm.Store(tmp_path / "c.zarr").n_obs == 100
    assert store.complete
    store.append(overlapping, allow_duplicates=True)
    obs = store.obs()
    assert store.n_obs == 150
    assert obs.index.is_unique
    store.verify()


def test_make_split_on_an_unfinished_build_is_refused(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = _writer.StoreWriter.commit

    def stop_after_two(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user stops the build
        return real(self, batch)

    monkeypatch.setattr(_writer.StoreWriter, "commit", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(sample(), tmp_path / "s.zarr")
    store = cm.Store(tmp_path / "s.zarr")
    assert not store.complete
    assert store.n_obs == 128
    with pytest.raises(ValueError, match=r"is unfinished \(128 cells committed\): a split now would leave out"):
        store.make_split("mine")
    assert store.splits == []


def test_a_split_that_fails_before_its_commit_leaves_the_committed_one_intact(store_path, monkeypatch):
    """make_split commits through the writer like a batch: its new array is flushed first, the manifest last."""
    store = cm.Store(store_path)
    before, array = store.split_codes("default"), store.manifest["splits"]["default"]["array"]
    real = _writer.write_manifest

    def power_cut(path, manifest):
        raise OSError("power cut before the commit")

    monkeypatch.setattr(_writer, "write_manifest", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.make_split("default", test_fraction=0.3, random_state=1, overwrite=True)
    monkeypatch.setattr(_writer, "write_manifest", real)
    reopened = cm.Store(store_path)
    assert reopened.manifest["splits"]["default"]["array"] == array  # the manifest still names the old version
    np.testing.assert_array_equal(reopened.split_codes("default"), before)
    assert reopened.verify()
    table = reopened.make_split("default", test_fraction=0.3, random_state=1, overwrite=True)  # the retry succeeds
    assert int(table["test"].sum()) == int((reopened.split_codes("default") == 2).sum()) > 0
    assert not (store_path / array).exists()  # the replaced version is gone
    assert sorted(p.name for p in (store_path / "splits").iterdir() if p.is_dir()) == [
        reopened.manifest["splits"]["default"]["array"].split("/")[1]
    ]
    assert cm.Store(store_path).verify()


def _with_bad_value(adata, row):
    bad = adata.copy()
    X = bad.X.tolil()
    X[row, 0] = 0.5  # not a count
    bad.X = X.tocsr()
    return bad


def test_a_build_stopped_by_a_bad_value_resumes_after_the_fix(tmp_path):
    good = sample()
    good.write_h5ad(tmp_path / "in.h5ad")
    _with_bad_value(good, 200).write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match=r"cell 200") as info:
        build(tmp_path / "in.h5ad", tmp_path / "s.zarr")
    assert "call build_store again with the same arguments to resume" in "".join(info.value.__notes__)
    assert cm.Store(tmp_path / "s.zarr").n_obs == 192  # three batches of 64 were committed
    good.write_h5ad(tmp_path / "in.h5ad")  # the fix
    store = build(tmp_path / "in.h5ad", tmp_path / "s.zarr")
    reference = build(good, tmp_path / "ref.zarr")
    assert (store.to_adata().X != reference.to_adata().X).nnz == 0
    assert list(store.obs().index) == list(reference.obs().index)
    store.verify()
    # a "fix" that also changes rows already committed is refused
    _with_bad_value(good, 200).write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match=r"cell 200"):
        build(tmp_path / "in.h5ad", tmp_path / "t.zarr")
    changed = good.copy()
    changed.X = changed.X * 2
    changed.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match=r"inputs changed since .*rows 0:64 differ from those the store committed"):
        build(tmp_path / "in.h5ad", tmp_path / "t.zarr")


@pytest.mark.parametrize("recovery", ["resume", "rollback"])
def test_a_failed_append_is_resumed_after_the_fix_or_rolled_back(tmp_path, recovery):
    first, more = sample(), sample(300, seed=1, prefix="m")
    store = build(first, tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="cell 230") as info:
        store.append(_with_bad_value(more, 230))
    assert "call append again to resume, or call Store.rollback()" in "".join(info.value.__notes__)
    partial = cm.Store(tmp_path / "s.zarr")
    assert not partial.complete
    assert partial.n_obs == 300 + 192
    partial.verify()  # what was committed is intact
    with pytest.raises(ValueError, match="unfinished"):
        partial.make_split("mine")
    other = sample(20, seed=4, prefix="o")
    with pytest.raises(ValueError, match=r"unfinished append of 1 other input|is not the input of the unfinished"):
        partial.append(other)
    if recovery == "resume":
        partial.append(more)  # the fixed input: its committed rows are the same
        expected = build([first, more], tmp_path / "ref.zarr")
    else:
        partial.rollback()
        expected = build(first, tmp_path / "ref.zarr")
    assert partial.complete
    partial.verify()
    assert (partial.to_adata().X != expected.to_adata().X).nnz == 0
    assert list(partial.obs().index) == list(expected.obs().index)
    assert partial.labels["cell_type"].tolist() == expected.labels["cell_type"].tolist()
    partial.append(other)  # the store takes appends again
    assert partial.n_obs == expected.n_obs + 20
    partial.verify()


def test_rollback_is_refused_when_there_is_nothing_to_undo(tmp_path, monkeypatch):
    store = build(sample(100), tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="is complete: there is no unfinished append"):
        store.rollback()
    monkeypatch.setattr(_writer.StoreWriter, "finish", lambda self: None)
    with pytest.raises(ValueError, match="unfinished"):
        build(sample(100), tmp_path / "t.zarr")
    with pytest.raises(ValueError, match="unfinished build, with no finished state to return to"):
        cm.Store(tmp_path / "t.zarr").rollback()


def _killed_child(step_calls: list, kill_at: int, work) -> int:
    """Run ``work`` in a forked child killed (SIGKILL) at its ``kill_at``-th file system step; returns the steps."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python 3.12+): the child only writes
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        count = [0]

        def counted(function):
            def wrapper(*args, **kwargs):
                count[0] += 1
                os.write(write, b".")
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return function(*args, **kwargs)

            return wrapper

        for name in step_calls:
            setattr(os, name, counted(getattr(os, name)))
        try:
            work()
        finally:
            os._exit(0)
    os.close(write)
    steps = 0
    with os.fdopen(read, "rb") as fh:
        steps = len(fh.read())
    os.waitpid(pid, 0)
    return steps


STEPS = ["replace", "fsync", "mkdir", "unlink"]


def test_sigkill_at_every_step_of_an_append_then_resume_or_rollback(tmp_path):
    first, more = sample(200), sample(150, seed=1, prefix="m")
    build(first, tmp_path / "base.zarr")
    expected = {"resume": build([first, more], tmp_path / "both.zarr").to_adata(),
                "rollback": build(first, tmp_path / "first.zarr").to_adata()}  # fmt: skip
    shutil.copytree(tmp_path / "base.zarr", tmp_path / "probe.zarr")
    total = _killed_child(STEPS, 0, lambda: cm.Store(tmp_path / "probe.zarr").append(more))
    assert total > 20
    points = sorted(set(np.linspace(1, total, 12).astype(int)))
    for i, point in enumerate(points):
        target = tmp_path / f"k{point}.zarr"
        shutil.copytree(tmp_path / "base.zarr", target)
        _killed_child(STEPS, point, lambda target=target: cm.Store(target).append(more))
        store = cm.Store(target)
        store.verify()  # whatever was committed is intact
        recovery = "resume" if i % 2 else "rollback"
        if not store.complete:
            store.append(more) if recovery == "resume" else store.rollback()
        elif store.n_obs == 200:  # killed before the append began
            recovery = "rollback"
        got = store.to_adata()
        assert store.complete
        assert store.verify()
        want = expected["resume"] if store.n_obs == 350 else expected[recovery]
        assert (got.X != want.X).nnz == 0
        assert list(got.obs_names) == list(want.obs_names)


def test_the_manifest_commits_only_files_already_on_disk(tmp_path, monkeypatch):
    """Power-loss safety: every chunk file and folder of the store is fsynced before a manifest names it."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the files being flushed")
    root = (tmp_path / "s.zarr").absolute()
    flushed, unflushed, commits = set(), [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        flushed.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(source, target, **kwargs):
        target = str(Path(target).absolute())
        if target == f"{root}/manifest.json":  # a commit: everything the store holds must be on disk already
            commits.append(target)
            files = [p for p in root.rglob("*") if p.is_file() and p.name != ".cellmint.lock"
                     and not p.name.startswith(".manifest.json")]  # fmt: skip
            unflushed.extend(str(p) for p in files if str(p) not in flushed)
            unflushed.extend(str(p.parent) for p in files if str(p.parent) not in flushed)
        result = real_replace(source, target, **kwargs)
        if str(Path(source).absolute()) in flushed:
            flushed.add(target)  # a flushed file renamed into place (the folder is flushed separately)
        return result

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    build(sample(200), root)
    assert len(commits) >= 5
    assert not unflushed, sorted(set(unflushed))[:5]
