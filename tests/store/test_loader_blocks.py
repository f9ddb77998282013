"""The loader's blocks follow the chunk files of counts: every file read once per epoch, every cell visited once."""

from __future__ import annotations

import numpy as np
import pytest

import cellmint as cm
from cellmint.store import _arrays, _sampling, _writer


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3,000 cells whose counts fill about 40 small chunk files (4,096 values each), so that blocks are many."""
    adata = cm.datasets.synthetic(3000, 300, n_cell_types=5, random_state=3, progress=False)
    path = tmp_path_factory.mktemp("blocks") / "s.zarr"
    patch = pytest.MonkeyPatch()
    patch.setattr(_writer, "DATA_CHUNK", 4096)
    try:
        store = cm.pp.build_store(adata, path, label_keys=["cell_type"], batch_cells=500, progress=False)
    finally:
        patch.undo()
    assert store._array("X/data").chunk == 4096
    return store


@pytest.fixture
def decodes(monkeypatch):
    """Chunk files of counts decoded (``X/data``), counted."""
    seen = []
    fill = _arrays.ChunkedArray._fill

    def counted(self, index, pieces, out):
        if self.name == "X/data":
            seen.append(index)
        return fill(self, index, pieces, out)

    monkeypatch.setattr(_arrays.ChunkedArray, "_fill", counted)
    return seen


def _files(store) -> int:
    return -(-store.nnz // store._array("X/data").chunk)


@pytest.mark.parametrize("batch_size", [64, 250, 1000])
def test_each_file_read_about_once_and_each_cell_once(store, decodes, batch_size):
    loader = store.loader(batch_size, split=None, random_state=1, prefetch=False)
    batches = [b["index"].numpy() for b in loader]
    seen = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(seen), np.arange(store.n_obs))  # every cell once
    assert not np.array_equal(seen, np.arange(store.n_obs))
    assert all(len(b) == batch_size for b in batches[:-1])
    windows = len(loader.dataset.plan())
    # a block is the cells starting in BLOCK_CHUNKS files, read with the head of the next file: at most
    # 1 + 1 / BLOCK_CHUNKS decodes per file, plus one per window where a block is cut between two windows.
    # Blocks of 256 cells read partly filled files twice or more (the bound fails for them, below)
    bound = _files(store) * (1 + 1 / _sampling.BLOCK_CHUNKS) + 2 * windows
    assert len(decodes) <= bound, (len(decodes), bound)
    assert len(np.unique(decodes)) == _files(store)
    decodes.clear()
    list(store.loader(batch_size, split=None, random_state=1, prefetch=False, block_size=37))
    assert len(decodes) > bound  # the measure above can fail


def test_sequential_reads_every_file_once_in_store_order(store, decodes):
    seen = np.concatenate([b["index"].numpy() for b in store.loader(300, split=None, shuffle=False, prefetch=False)])
    np.testing.assert_array_equal(seen, np.arange(store.n_obs))
    assert len(decodes) <= _files(store) + len(store.loader(300, split=None, shuffle=False).dataset.plan())


def test_blocks_are_runs_of_cells_of_the_same_files(store):
    loader = store.loader(100, split=None, random_state=0)
    dataset = loader.dataset
    starts = store._array("X/indptr").read(0, store.n_obs)
    files = starts // (store._array("X/data").chunk * _sampling.BLOCK_CHUNKS)
    np.testing.assert_array_equal(dataset.block_ids, files)
    assert len(np.unique(files)) > 10  # many blocks, so that their order is shuffled
    # a batch mixes about fetch_blocks blocks, not one
    first = loader.dataset.plan()[0][1][0]
    assert len(np.unique(files[first])) >= 4


def test_split_balance_resume_and_workers_with_file_blocks(store):
    store.make_split("cells", test_fraction=0.3, group_key=False, random_state=0, overwrite=True)
    train = store.split_rows("cells", "train")
    seen = np.concatenate([b["index"].numpy() for b in store.loader(128, split="cells:train", random_state=5)])
    np.testing.assert_array_equal(np.sort(seen), train)
    full = [b["index"].numpy() for b in store.loader(128, split="cells:train", random_state=5, balance="sqrt")]
    rest = [b["index"].numpy() for b in store.loader(128, split="cells:train", random_state=5, balance="sqrt",
                                                     start_batch=5)]  # fmt: skip
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest, strict=True):
        np.testing.assert_array_equal(a, b)
    drawn = np.concatenate(full)
    assert set(np.unique(drawn)) <= set(train)
    assert abs(len(drawn) - len(train)) < 0.05 * len(train)
    shared = np.concatenate([b["index"].numpy() for b in store.loader(128, split=None, num_workers=2)])
    np.testing.assert_array_equal(np.sort(shared), np.arange(store.n_obs))


def test_batches_hold_the_stored_counts(store):
    adata = store.to_adata()
    for batch in store.loader(256, split=None, random_state=2, dense=True):
        np.testing.assert_array_equal(batch["X"].numpy(), adata.X[batch["index"].numpy()].toarray())
