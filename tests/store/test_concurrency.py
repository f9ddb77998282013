"""One writer at a time: two builders on one path, stale handles, readers during appends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

import cellmint as cm
from cellmint._utils._lock import LockBusyError
from cellmint.store import _format, _writer

BUILDER = textwrap.dedent(
    """
    import sys
    import anndata, scanpy, sklearn  # imported by the build on first use: loaded before "ready", so that the
    import cellmint as cm            # go signal starts the build itself, not seconds of imports
    import cellmint.pp._build_store
    from cellmint._utils._lock import LockBusyError
    print("ready", flush=True)
    sys.stdin.readline()  # the go signal
    try:
        cm.pp.build_store(sys.argv[1], sys.argv[2], label_keys=["cell_type"], group_key="donor", batch_cells=100,
                          progress=False)
    except LockBusyError as err:
        print(f"refused: {err}", flush=True)
        sys.exit(3)
    print("done", flush=True)
    """
)
ARGS = {"label_keys": ["cell_type"], "group_key": "donor", "batch_cells": 100, "progress": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concurrency")
    path = folder / "input.h5ad"
    cm.datasets.synthetic(8_000, 300, random_state=5, path=path, progress=False).file.close()
    reference = cm.pp.build_store(path, folder / "reference.zarr", **ARGS)
    return path, reference.to_adata()


def _builder(source, target):
    env = {**os.environ, "CELLMINT_PROGRESS": "0"}
    child = subprocess.Popen([sys.executable, "-c", BUILDER, str(source), str(target)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    return child


def _go(child):
    child.stdin.write("go\n")
    child.stdin.flush()


def _assert_equal_to_a_single_build(path, reference):
    store = cm.Store(path)
    assert store.complete
    store.verify()
    got = store.to_adata()
    assert got.n_obs == reference.n_obs
    assert (got.X != reference.X).nnz == 0
    assert list(got.obs_names) == list(reference.obs_names)
    assert (got.obs["cell_type"] == reference.obs["cell_type"]).all()
    assert (got.obs["donor"] == reference.obs["donor"]).all()


def test_two_builders_started_together_one_is_refused(source, tmp_path):
    path, reference = source
    target = tmp_path / "s.zarr"
    children = [_builder(path, target), _builder(path, target)]
    for child in children:
        _go(child)
    outputs = [child.communicate(timeout=300)[0] for child in children]
    codes = sorted(child.returncode for child in children)
    assert codes == [0, 3], outputs
    refused = next(out for out in outputs if out.startswith("refused"))
    # the holder is named by pid, or, when refused in the instant before the holder wrote its name, said so
    assert f"the store at {target} is being written by another process (" in refused
    _assert_equal_to_a_single_build(target, reference)


def test_a_builder_started_while_another_builds_is_refused(source, tmp_path):
    path, reference = source
    target = tmp_path / "s.zarr"
    first, second = _builder(path, target), _builder(path, target)
    _go(first)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # start the second once the first has committed batches
        try:
            if json.loads((target / "manifest.json").read_text())["n_obs"] >= 1000:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    _go(second)
    out_second = second.communicate(timeout=300)[0]
    out_first = first.communicate(timeout=300)[0]
    assert second.returncode == 3, out_second
    assert "is being written by another process" in out_second
    assert first.returncode == 0, out_first
    _assert_equal_to_a_single_build(target, reference)
    # a builder that comes after the first finished finds the complete store and changes nothing
    generation = cm.Store(target).manifest["generation"]
    cm.pp.build_store(path, target, **ARGS)
    assert cm.Store(target).manifest["generation"] == generation
    _assert_equal_to_a_single_build(target, reference)


def _sample(n_obs, seed, prefix):
    adata = cm.datasets.synthetic(n_obs, 50, n_donors=4, random_state=seed, progress=False)
    adata.obs_names = [f"{prefix}{i}" for i in range(n_obs)]
    return adata


def test_a_stale_handle_never_writes_an_old_manifest_back(tmp_path):
    """The issue's case: s1, s2 = Store(p), Store(p); s2.append(b); s1.make_split("mine") lost b's cells."""
    a, b, c = _sample(200, 1, "a"), _sample(150, 2, "b"), _sample(80, 3, "c")
    store = cm.pp.build_store(a, tmp_path / "s.zarr", label_keys=["cell_type"], batch_cells=64, progress=False)
    s1, s2, s3 = cm.Store(store.path), cm.Store(store.path), cm.Store(store.path)
    s2.append(b)
    s1.make_split("mine")  # s1 read the store before the append: it reloads, then splits every cell
    assert s1.n_obs == 350
    assert len(s1.split_codes("mine")) == 350
    assert (s1.split_codes("mine") >= 0).all()
    s3.append(c)  # another stale handle appends after both
    fresh = cm.Store(store.path)
    assert fresh.n_obs == 430
    assert list(fresh.obs().index) == [*a.obs_names, *b.obs_names, *c.obs_names]
    assert set(fresh.splits) == {"default", "mine"}
    fresh.verify()
    # the commit itself is a compare-and-swap: a manifest read before another commit is refused
    stale = json.loads((store.path / "manifest.json").read_text())
    fresh.make_split("other")
    with pytest.raises(_format.StaleManifestError, match=r"changed by another writer .*nothing was written"):
        _format.write_manifest(store.path, stale)
    assert set(cm.Store(store.path).splits) == {"default", "mine", "other"}


def test_readers_during_an_append_see_a_consistent_prefix(tmp_path):
    inputs = [_sample(300, seed, f"i{seed}_") for seed in range(4)]
    store = cm.pp.build_store(inputs[0], tmp_path / "s.zarr", label_keys=["cell_type"], batch_cells=32,
                              progress=False)  # fmt: skip
    expected_X = sp.vstack([adata.X for adata in inputs], format="csr")
    expected_names = np.concatenate([adata.obs_names for adata in inputs])
    expected_types = np.concatenate([adata.obs["cell_type"].astype(str) for adata in inputs])
    errors = []

    def append():
        try:
            cm.Store(store.path).append(inputs[1:])
        except Exception as err:
            errors.append(err)

    writer = threading.Thread(target=append)
    writer.start()
    seen = set()
    while writer.is_alive() or len(seen) < 2:
        reader = cm.Store(store.path)
        n = reader.n_obs
        seen.add(n)
        X = reader.read_rows(0, n)
        assert (expected_X[:n] != X).nnz == 0
        obs = reader.obs()
        assert list(obs.index) == list(expected_names[:n])
        assert (obs["cell_type"].astype(str).to_numpy() == expected_types[:n]).all()
        if not writer.is_alive():
            break
    writer.join()
    assert not errors, errors
    assert len(seen) >= 3  # the readers saw the store grow
    final = cm.Store(store.path)
    assert final.n_obs == 1200
    final.verify()


def test_a_second_writer_in_the_same_process_is_refused(tmp_path, monkeypatch):
    store = cm.pp.build_store(_sample(100, 1, "a"), tmp_path / "s.zarr", label_keys=["cell_type"], progress=False)
    committing, release = threading.Event(), threading.Event()
    real = _writer.StoreWriter.commit

    def slow_commit(self, batch):
        committing.set()
        release.wait(30)
        return real(self, batch)

    monkeypatch.setattr(_writer.StoreWriter, "commit", slow_commit)
    thread = threading.Thread(target=lambda: cm.Store(store.path).append(_sample(50, 2, "b")))
    thread.start()
    assert committing.wait(30)
    try:
        with pytest.raises(LockBusyError, match=r"is being written by another thread of this process"):
            store.make_split("mine")
        with pytest.raises(LockBusyError, match="only one writer at a time"):
            cm.pp.build_store(_sample(100, 1, "a"), store.path, label_keys=["cell_type"], progress=False)
    finally:
        release.set()
        thread.join()
    assert cm.Store(store.path).n_obs == 150
