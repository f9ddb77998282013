from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import numpy as np
import pytest

import cellmint as cm
from cellmint.datasets import _fetch, _real
from cellmint.datasets._registry import DATASETS


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLMINT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLMINT_DATA_DIR", raising=False)
    return tmp_path / "cache"


def test_bundled_files_fit_the_size_budget():
    sizes = {i.name: _fetch.bundled_path(i).stat().st_size for i in DATASETS.values() if i.bundled}
    assert set(sizes) == {"cellbench", "cellbench_10x", "glioblastoma_panobinostat", "papalexi_crispr"}
    assert max(sizes.values()) <= 5 * 10**6
    assert sum(sizes.values()) <= 15 * 10**6
    licences = (_fetch.bundled_path(DATASETS["cellbench"]).parent / "LICENSES.md").read_text()
    for info in DATASETS.values():
        if info.bundled:
            assert info.filename in licences


@pytest.mark.parametrize("name", ["cellbench", "cellbench_10x", "glioblastoma_panobinostat", "papalexi_crispr"])
def test_bundled_loaders(name):
    info = DATASETS[name]
    adata = getattr(cm.datasets, name)()
    assert adata.shape == (info.n_obs, info.n_vars)
    for key in info.labels:
        assert key in adata.obs
        assert adata.obs[key].notna().any()
    X = adata.X
    assert np.array_equal(X.data, np.round(X.data))  # raw counts
    assert (X.data >= 0).all()
    assert adata.uns["dataset"]["sha256"] == info.sha256
    assert adata.var_names.is_unique


def test_cellbench_subset_is_singlets_of_both_technologies():
    adata = cm.datasets.cellbench()
    counts = adata.obs.groupby(["technology", "cell_line"], observed=True).size()
    assert counts["CEL-seq2"].tolist() == [60] * 5
    assert counts["Drop-seq"].sum() == 210
    assert adata.var_names.str.match(r"^(ENSG\d{11}|ERCC-\d{5})$").all()  # genes and spike-ins


def test_backed_loading(isolated_cache):
    adata = cm.datasets.glioblastoma_panobinostat(backed=True)
    try:
        assert adata.isbacked
        assert adata.shape == (5000, 300)
    finally:
        adata.file.close()


def test_available_lists_every_dataset():
    table = cm.datasets.available()
    assert set(table.index) == set(DATASETS)
    assert table.loc["cellbench", "bundled"]
    assert table.loc["cellbench", "local"]
    assert not table.loc["pbmc3k", "bundled"]
    assert table["citation"].str.len().min() > 20


def test_unknown_name():
    with pytest.raises(KeyError, match="Unknown dataset 'nope'"):
        cm.datasets.load("nope")


def _fake_large_dataset(tmp_path, payload: bytes = b"pretend h5ad bytes" * 1000):
    source = tmp_path / "upstream" / "big.h5ad"
    source.parent.mkdir()
    source.write_bytes(payload)
    info = replace(
        DATASETS["pbmc3k"],
        name="big",
        filename="big.h5ad",
        sha256=hashlib.sha256(payload).hexdigest(),
        url=source.as_uri(),
    )
    return info, source


def test_download_from_url_verifies_and_caches(tmp_path, isolated_cache):
    info, source = _fake_large_dataset(tmp_path)
    path = _fetch.dataset_path(info, progress=False)
    assert path == isolated_cache / "big.h5ad"
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # second call is served from the cache, no download
    assert _fetch.dataset_path(info) == path


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, isolated_cache):
    info, _ = _fake_large_dataset(tmp_path)
    info = replace(info, sha256="0" * 64)
    with pytest.raises(ValueError, match="expected 0000"):
        _fetch.dataset_path(info, progress=False)
    assert not (isolated_cache / "big.h5ad").exists()
    assert not (isolated_cache / "big.h5ad.part").exists()


def test_local_copy_with_wrong_checksum_is_refused(tmp_path, isolated_cache):
    info, _ = _fake_large_dataset(tmp_path)
    corrupt = tmp_path / "mine"
    corrupt.mkdir()
    (corrupt / "big.h5ad").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupted or a different version"):
        _fetch.dataset_path(info, data_dir=corrupt)


def test_data_dir_environment_variable(tmp_path, isolated_cache, monkeypatch):
    info, source = _fake_large_dataset(tmp_path)
    monkeypatch.setenv("CELLMINT_DATA_DIR", str(source.parent))
    assert _fetch.dataset_path(replace(info, url=None)) == source


def test_missing_file_without_url_explains_where_to_put_it(tmp_path, isolated_cache):
    with pytest.raises(FileNotFoundError, match="CELLMINT_DATA_DIR") as err:
        cm.datasets.pbmc3k(data_dir=tmp_path)
    assert DATASETS["pbmc3k"].sha256 in str(err.value)


@pytest.mark.realdata
@pytest.mark.parametrize("name", [n for n, i in DATASETS.items() if not i.bundled])
def test_large_datasets_load_from_shared_data(name, shared_data, isolated_cache):
    info = DATASETS[name]
    adata = cm.datasets.load(name, data_dir=shared_data, backed=True)
    try:
        assert adata.shape == (info.n_obs, info.n_vars)
        assert all(key in adata.obs for key in info.labels)
    finally:
        adata.file.close()


def test_loader_docstrings_cite_the_study():
    for name, info in DATASETS.items():
        doc = getattr(cm.datasets, name).__doc__
        assert info.citation in doc
        assert f"{info.n_obs} cells" in doc
    assert _real.cellbench.__name__ == "cellbench"


def test_copy_of_shared_file_is_accepted(tmp_path, isolated_cache, shared_data):
    target = tmp_path / "mine"
    target.mkdir()
    shutil.copy(shared_data / "cbmc_citeseq_8617.h5ad", target)
    adata = cm.datasets.cbmc_citeseq(data_dir=target)
    assert adata.obs["cell_type"].nunique() == 13
