"""cm.pp.build_store and cm.Store: contents, gene alignment, crash safety and resumption, integrity."""

from __future__ import annotations

import itertools
import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import cellmint as cm
from _helpers import write_zarr_v3
from cellmint.store import _format, _writer


def sample(n_obs=300, n_vars=80, seed=0, prefix="c") -> ad.AnnData:
    adata = cm.datasets.synthetic(n_obs, n_vars, n_donors=4, n_batches=2, random_state=seed, progress=False)
    adata.obs_names = [f"{prefix}{i}" for i in range(n_obs)]
    adata.obs["depth"] = np.arange(n_obs, dtype=float)
    return adata


@pytest.fixture
def inputs(tmp_path):
    first = sample(seed=1, prefix="a")
    second = sample(n_obs=250, seed=2, prefix="b")[:, 10:]  # lacks the first 10 genes
    second = second.copy()
    third = sample(n_obs=120, seed=3, prefix="z")
    first_path = tmp_path / "first.h5ad"
    first.write_h5ad(first_path)
    zarr_path = tmp_path / "third.zarr"
    write_zarr_v3(third, zarr_path)
    return [first, second, third], [first_path, second, zarr_path]


def build(data, path, **kwargs):
    defaults = {"label_keys": ["cell_type", "cell_subtype"], "group_key": "donor", "obs_keys": ["batch", "depth"],
                "batch_cells": 64, "genes": "intersection", "progress": False}  # fmt: skip
    return cm.pp.build_store(data, path, **{**defaults, **kwargs})


def test_store_holds_the_aligned_inputs(inputs, tmp_path):
    adatas, data = inputs
    store = build(data, tmp_path / "s.zarr")
    assert store.complete
    assert store.n_obs == 300 + 250 + 120
    assert list(store.var_names) == list(adatas[0].var_names[10:])  # intersection, in the first input's order
    got = store.to_adata()
    expected = ad.concat([a[:, store.var_names] for a in adatas])
    assert (got.X != expected.X).nnz == 0
    assert list(got.obs_names) == list(expected.obs_names)
    for key in ("cell_type", "cell_subtype", "donor", "batch"):
        assert (got.obs[key].astype(str).to_numpy() == expected.obs[key].astype(str).to_numpy()).all()
    np.testing.assert_array_equal(got.obs["depth"], expected.obs["depth"])
    # library size and detected genes over ALL genes of each input, not just the panel
    full = np.concatenate([np.asarray(a.X.sum(axis=1)).ravel() for a in adatas])
    np.testing.assert_allclose(got.obs["library_size"], full)
    assert (got.obs["library_size"] > np.asarray(got.X.sum(axis=1)).ravel()).any()
    assert list(got.obs["input"].cat.categories) == [str(data[0]), "adata[1]", str(data[2])]
    assert store.verify() == {"batches": len(store.manifest["batches"]), "cells": 670, "nnz": store.nnz}
    summary = store.summary()
    assert sum(summary["labels"]["cell_type"].values()) == 670
    assert set(summary["groups"]) == {f"donor_{i}" for i in range(4)}


def test_union_fills_missing_genes_with_zeros(inputs, tmp_path):
    adatas, data = inputs
    store = build(data[:2], tmp_path / "u.zarr", genes="union")
    assert store.n_vars == 80
    got = store.to_adata()
    assert got[300:, :10].X.nnz == 0  # genes the second input lacks
    assert (got[:300].X != adatas[0].X).nnz == 0


def test_gene_panel_as_list_and_var_mask(inputs, tmp_path):
    adatas, data = inputs
    panel = list(adatas[0].var_names[[50, 12, 40]])
    store = build(data, tmp_path / "l.zarr", genes=panel)
    assert list(store.var_names) == panel
    np.testing.assert_array_equal(store.read_rows(0, 300).toarray(), adatas[0][:, panel].X.toarray())
    adatas[0].var["keep"] = np.arange(80) >= 70
    masked = build(adatas[0], tmp_path / "m.zarr", genes="keep")
    assert list(masked.var_names) == list(adatas[0].var_names[70:])


class Crash(RuntimeError):
    pass


def test_crash_then_rerun_resumes_without_loss_or_duplicates(inputs, tmp_path, monkeypatch):
    _, data = inputs
    reference = build(data, tmp_path / "ref.zarr").to_adata()
    real = _writer.StoreWriter.commit
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # inside the second input
            raise Crash("power cut")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_writer.StoreWriter, "commit", crashing)
    with pytest.raises(Crash):
        build(data, tmp_path / "s.zarr")
    partial = cm.Store(tmp_path / "s.zarr")
    assert not partial.complete
    assert partial.n_obs == 6 * 64 - 300 % 64 + 0 or partial.n_obs == sum(
        b["rows"][1] - b["rows"][0] for b in partial.manifest["batches"]
    )
    assert partial.n_obs < reference.n_obs
    partial.verify()  # what was committed is intact
    monkeypatch.setattr(_writer.StoreWriter, "commit", real)
    store = build(data, tmp_path / "s.zarr")
    got = store.to_adata()
    assert store.complete
    assert got.n_obs == reference.n_obs
    assert (got.X != reference.X).nnz == 0
    assert list(got.obs_names) == list(reference.obs_names)
    store.verify()


def test_crash_between_write_and_commit_drops_the_half_written_batch(inputs, tmp_path, monkeypatch):
    _, data = inputs
    reference = build(data, tmp_path / "ref.zarr").to_adata()
    real = _writer.write_manifest
    calls = {"n": 0}

    def crashing(path, manifest):
        calls["n"] += 1
        if calls["n"] == 5:  # the arrays of this batch are written, its commit never happens
            raise Crash("killed before commit")
        return real(path, manifest)

    monkeypatch.setattr(_writer, "write_manifest", crashing)
    with pytest.raises(Crash):
        build(data, tmp_path / "s.zarr")
    monkeypatch.setattr(_writer, "write_manifest", real)
    store = build(data, tmp_path / "s.zarr")
    assert (store.to_adata().X != reference.X).nnz == 0
    store.verify()


def test_changed_input_is_refused_on_resume(inputs, tmp_path, monkeypatch):
    adatas, data = inputs
    monkeypatch.setattr(_writer.StoreWriter, "finish", lambda self: None)  # leave the build unfinished
    with pytest.raises(ValueError, match="is unfinished"):  # so the default split is refused
        build(data, tmp_path / "s.zarr")
    monkeypatch.undo()
    changed = adatas[0].copy()
    changed.X = changed.X * 2
    changed.write_h5ad(data[0])
    with pytest.raises(ValueError, match="inputs changed since the store"):
        build(data, tmp_path / "s.zarr")
    with pytest.raises(FileExistsError, match="pass resume=True"):
        build(data, tmp_path / "s.zarr", resume=False)
    assert build(data, tmp_path / "s.zarr", overwrite=True).complete


def test_existing_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "notes.txt").write_text("someone's files")
    with pytest.raises(FileExistsError, match="is not a cellmint store"):
        build(sample(), tmp_path / "x.zarr")


def test_verify_finds_corruption(inputs, tmp_path):
    _, data = inputs
    store = build(data, tmp_path / "s.zarr")
    import zarr

    values = zarr.open_group(tmp_path / "s.zarr", mode="r+")["X/data"]
    first_of_batch_1 = store.manifest["batches"][1]["nnz"][0]
    values[first_of_batch_1] = values[first_of_batch_1] + 1  # one count silently changed on disk
    with pytest.raises(ValueError, match=r"X \(indptr, indices, data\) rows 64:128 \(batch 1, input 0\) fails"):
        cm.Store(tmp_path / "s.zarr").verify()
    manifest = tmp_path / "s.zarr" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(ValueError, match="manifest of the store .* is corrupted"):
        cm.Store(tmp_path / "s.zarr")
    assert store.n_obs == 670  # an open Store keeps its manifest


def test_bad_inputs_are_named(tmp_path):
    adata = sample()
    lognorm = adata.copy()
    lognorm.X = np.log1p(lognorm.X)
    with pytest.raises(ValueError, match=r"adata\[0\]: X has non-integer values"):
        build(lognorm, tmp_path / "a.zarr", genes=None)
    with pytest.raises(KeyError, match="has no obs column \\['tissue'\\]"):
        build(adata, tmp_path / "b.zarr", label_keys=["tissue"])
    empty = adata.copy()
    empty.obs["cell_type"] = empty.obs["cell_type"].astype(object)
    empty.obs.iloc[3, empty.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(ValueError, match=r"Label 'cell_type' is empty \(NaN or blank\) for 1 cells"):
        build(empty, tmp_path / "c.zarr")
    other = sample(prefix="o")
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="share no genes"):
        build([adata, other], tmp_path / "d.zarr")
    with pytest.raises(ValueError, match="other genes than"):
        build([adata, other], tmp_path / "e.zarr", genes=None)
    dup = adata.copy()
    dup.var_names = ["g"] * dup.n_vars
    with pytest.raises(ValueError, match="duplicated gene names"):
        build(dup, tmp_path / "f.zarr")


def test_ensembl_versions_can_be_ignored(tmp_path):
    adata = cm.datasets.glioblastoma_panobinostat()
    unversioned = adata.copy()
    unversioned.var_names = [name.split(".")[0] for name in adata.var_names]
    store = cm.pp.build_store([adata, unversioned], tmp_path / "g.zarr", genes="intersection",
                              strip_ensembl_versions=True, label_keys=["condition"], allow_duplicates=True,
                              progress=False)  # the same cells twice, on purpose  # fmt: skip
    assert store.n_vars == adata.n_vars
    assert store.var_names[0] == unversioned.var_names[0]
    got = store.to_adata()
    assert (got[: adata.n_obs].X != got[adata.n_obs :].X).nnz == 0


def test_10x_mtx_folder(tmp_path):
    import gzip

    import scipy.io

    adata = sample(n_obs=50, n_vars=30)
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(adata.X.T).astype(np.int64))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"ID{i}\t{name}\tGene Expression\n" for i, name in enumerate(adata.var_names))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{name}\n" for name in adata.obs_names)
    store = cm.pp.build_store(folder, tmp_path / "x.zarr", progress=False)
    assert (store.to_adata().X != adata.X).nnz == 0


def test_manifest_records_inputs_batches_and_versions(inputs, tmp_path):
    _, data = inputs
    build(data, tmp_path / "s.zarr")
    manifest = json.loads((tmp_path / "s.zarr" / "manifest.json").read_text())
    assert manifest["format_version"] == _format.FORMAT_VERSION
    assert manifest["cellmint_version"] == cm.__version__
    assert [i["n_obs"] for i in manifest["inputs"]] == [300, 250, 120]
    assert all(len(i["fingerprint"]) == 64 for i in manifest["inputs"])
    rows = [b["rows"] for b in manifest["batches"]]
    assert rows[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
    assert manifest["state"] == "complete"


def test_empty_inputs_and_mixed_obs_types_are_refused(tmp_path):
    adata = sample()
    with pytest.raises(ValueError, match=r"adata\[1\] is empty \(0 cells × 80 genes\)"):
        build([adata, adata[:0].copy()], tmp_path / "a.zarr")
    with pytest.raises(ValueError, match="No input given"):
        build([], tmp_path / "b.zarr")
    other = sample(prefix="o")
    other.obs["depth"] = other.obs["depth"].astype(str)
    with pytest.raises(ValueError, match="obs column 'depth' holds numbers in the first input"):
        build([adata, other], tmp_path / "c.zarr")


def test_stores_of_other_format_versions_are_refused_clearly(inputs, tmp_path):
    _, data = inputs
    build(data[:1], tmp_path / "s.zarr")
    manifest_file = tmp_path / "s.zarr" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = _format.FORMAT_VERSION + 1
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format version \d+, written by cellmint .*Upgrade cellmint"):
        cm.Store(tmp_path / "s.zarr")
    manifest["format_version"] = 0
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no longer reads .* rebuild it"):
        cm.Store(tmp_path / "s.zarr")


def test_non_canonical_and_integer_inputs_are_stored_canonically(tmp_path):
    indptr = np.array([0, 3, 5])
    indices = np.array([4, 1, 4, 0, 2])  # row 0: unsorted, gene 4 twice
    X = sp.csr_matrix((np.array([1, 2, 3, 5, 6], dtype=np.int64), indices, indptr), shape=(2, 6))
    adata = ad.AnnData(X=X)
    adata.obs_names, adata.var_names = ["a", "b"], [f"g{i}" for i in range(6)]
    store = cm.pp.build_store(adata, tmp_path / "s.zarr", progress=False)
    got = store.read_rows(0, 2)
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.toarray(), X.toarray())
    np.testing.assert_array_equal(store.obs()["library_size"], [6, 11])
    np.testing.assert_array_equal(store.obs()["n_genes"], [2, 2])


def test_the_default_split_keeps_groups_whole_and_follows_the_seed(inputs, tmp_path):
    _, data = inputs
    store = build(data, tmp_path / "a.zarr", random_state=3)
    info = store.manifest["splits"]["default"]
    assert (info["test_fraction"], info["val_fraction"], info["group_key"]) == (0.1, 0.1, "donor")
    parts = store.split_codes("default")
    donors = store.obs()["donor"].to_numpy()
    assert all(len(set(parts[donors == d])) == 1 for d in set(donors))  # no donor in two parts
    again = build(data, tmp_path / "b.zarr", random_state=3)
    np.testing.assert_array_equal(again.split_codes("default"), parts)
    assert len(store.loader(32)) > 0  # the loader's default (train part of "default") works right away
