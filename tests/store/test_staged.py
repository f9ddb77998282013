"""Counts staged on the device: the batches hold the stored counts, every cell once per epoch, every rank its share."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellmint as cm
from cellmint.store._staged import StagedBatches, fits_device, staged_bytes, store_counts
from cellmint.tl._annotation_data import from_anndata, from_store


@pytest.fixture(scope="module")
def adata():
    data = cm.datasets.synthetic(2_000, 150, n_cell_types=4, random_state=5, progress=False)
    data.obs["part"] = np.where(np.arange(data.n_obs) % 5 == 0, "test", "train")
    return data


@pytest.fixture(scope="module")
def store(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("staged") / "s.zarr"
    store = cm.pp.build_store(adata, path, label_keys=["cell_type"], batch_cells=700, progress=False)
    return store


def _epoch(loader, epoch: int = 0) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("source", ["anndata", "store"])
@pytest.mark.parametrize("balance", [None, "sqrt"])
def test_batches_hold_the_stored_counts_of_their_cells(adata, store, source, balance):
    rows = np.flatnonzero(adata.obs["part"].to_numpy() == "train")
    if source == "anndata":
        data = from_anndata(adata, ["cell_type"], split="part", layer=None, genes=None, group_key=None,
                            input_kind="auto", random_state=0, embedding_keys=[])  # fmt: skip
    else:
        data = from_store(store, ["cell_type"], "default")
    loader = data.staged_loader(rows, device=torch.device("cpu"), batch_size=96, balance=balance, random_state=1)
    X = sp.csr_matrix(adata.X)
    names = adata.obs["cell_type"].astype(str).to_numpy()
    library = np.asarray(X.sum(axis=1)).ravel()
    batches = _epoch(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        index = batch["index"].numpy()
        np.testing.assert_array_equal(batch["X"].numpy(), X[index].toarray())
        labels = np.asarray(data.classes["cell_type"])[batch["labels"]["cell_type"].numpy()]
        np.testing.assert_array_equal(labels, names[index])
        np.testing.assert_allclose(batch["library_size"].numpy(), library[index], rtol=1e-6)
    visited = np.concatenate([b["index"].numpy() for b in batches])
    if balance is None:  # every training cell once, nothing else
        np.testing.assert_array_equal(np.sort(visited), rows)
    else:
        assert set(visited) <= set(rows)
    assert data.stored_values(rows) == X[rows].nnz


def test_epochs_are_seeded_and_shuffled_as_a_whole(adata):
    X = sp.csr_matrix(adata.X.astype(np.float32))
    codes = {"cell_type": adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)}
    rows = np.arange(adata.n_obs)

    def order(random_state, epoch):
        staged = StagedBatches(None, rows, ["cell_type"], batch_size=100, matrix=X, library=np.ones(len(rows)),
                               codes=codes, random_state=random_state, distributed="none")  # fmt: skip
        staged.set_epoch(epoch)
        return np.concatenate([b["index"].numpy() for b in staged])

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    first = order(0, 0)[:100]  # one window: the first batch draws from the whole epoch, not from a few blocks
    assert first.max() - first.min() > 0.8 * len(rows)


def test_ranks_share_each_global_batch(adata, monkeypatch):
    X = sp.csr_matrix(adata.X.astype(np.float32))
    codes = {"cell_type": adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)}
    rows = np.arange(adata.n_obs)
    parts = []
    for rank in range(3):
        staged = StagedBatches(None, rows, ["cell_type"], batch_size=128, matrix=X, library=np.ones(len(rows)),
                               codes=codes, random_state=2, distributed="global")  # fmt: skip
        monkeypatch.setattr(staged, "_position", lambda rank=rank: (rank, 3, 0, 1))
        parts.append(list(staged))
    for step in zip(*parts, strict=True):
        whole = step[0]["global_index"].numpy()
        assert all(np.array_equal(part["global_index"].numpy(), whole) for part in step)
        np.testing.assert_array_equal(np.sort(np.concatenate([p["index"].numpy() for p in step])), np.sort(whole))
    visited = np.concatenate([p["index"].numpy() for rank in parts for p in rank])
    np.testing.assert_array_equal(np.sort(visited), rows)


def test_store_counts_reads_the_rows_asked_for(store, adata):
    rows = np.array([3, 4, 500, 1999])
    streamed = store.loader(64, rows=rows, shuffle=False).dataset
    matrix = store_counts(streamed, rows)
    assert matrix.shape == (2000, adata.n_vars)
    np.testing.assert_array_equal(matrix[rows].toarray(), sp.csr_matrix(adata.X)[rows].toarray())
    assert matrix.nnz == sp.csr_matrix(adata.X)[rows].nnz  # the other rows are empty


def test_staging_is_decided_by_the_device_memory():
    assert not fits_device(10, 10, torch.device("cpu"))  # a CPU streams unless staging is asked for
    assert staged_bytes(1_000_000_000, 1_000_000) == 8_000_000_000 + 8 * 1_000_001 + 12_000_000


def test_only_the_training_cells_are_staged(adata):
    rows = np.flatnonzero(adata.obs["part"].to_numpy() == "train")
    data = from_anndata(adata, ["cell_type"], split="part", layer=None, genes=None, group_key=None,
                        input_kind="auto", random_state=0, embedding_keys=[])  # fmt: skip
    loader = data.staged_loader(rows, device=torch.device("cpu"), batch_size=64, balance="sqrt", random_state=0)
    batches = _epoch(loader)
    dataset = loader.dataset
    assert dataset._device_data.numel() == data.stored_values(rows) < sp.csr_matrix(adata.X).nnz
    assert len({len(b["index"]) for b in batches[:-1]}) == 1  # whole batches but the last: one window
