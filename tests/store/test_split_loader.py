"""Store splits, the mini-batch loader, appending, and resumption after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellmint as cm


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = cm.datasets.synthetic(3000, 200, n_cell_types=4, n_subtypes=2, n_donors=12, n_batches=3,
                                  random_state=4, progress=False)  # fmt: skip
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    return cm.pp.build_store(adata, path, label_keys=["cell_type", "cell_subtype"], group_key="donor",
                             obs_keys=["batch"], batch_cells=500, progress=False)  # fmt: skip


def test_group_split_keeps_donors_whole_and_labels_balanced(store):
    table = store.make_split("donors", test_fraction=0.25, val_fraction=0.15, random_state=1)
    codes = store.split_codes("donors")
    donors = pd.Series(store.groups.astype(str))
    assert (donors.groupby(codes).nunique().sum()) == donors.nunique()  # every donor in exactly one part
    fractions = table.sum(axis=0) / store.n_obs
    assert abs(fractions["test"] - 0.25) < 0.1
    assert abs(fractions["val"] - 0.15) < 0.1
    proportions = table / table.sum(axis=0)
    # 12 donors with donor-specific cell-type mixes: the parts' label mix stays within 15 points of train
    assert (proportions.sub(proportions["train"], axis=0).abs().max() < 0.15).all()
    assert store.verify()["cells"] == 3000  # includes the leakage check
    assert store.summary()["splits"]["donors"] == {k: int(v) for k, v in table.sum(axis=0).items()}
    with pytest.raises(ValueError, match="exists"):
        store.make_split("donors")
    again = cm.Store(store.path)  # persisted
    np.testing.assert_array_equal(again.split_codes("donors"), codes)


def test_group_split_on_real_data_matches_label_proportions(tmp_path):
    adata = cm.datasets.glioblastoma_panobinostat()  # 10 samples of 5 patients, DMSO or panobinostat
    store = cm.pp.build_store(adata, tmp_path / "g.zarr", label_keys=["condition"], group_key="sample_id",
                              progress=False)  # fmt: skip
    for seed in range(3):
        table = store.make_split("s", test_fraction=0.2, random_state=seed, overwrite=True)
        parts = table / table.sum(axis=0)
        overall = adata.obs["condition"].value_counts(normalize=True)
        for part in ("train", "test"):
            np.testing.assert_allclose(parts[part].loc[overall.index], overall, atol=0.02)  # stated tolerance
        assert abs(table["test"].sum() / adata.n_obs - 0.2) < 0.05
        store.verify()


def test_cell_split_is_exactly_stratified_and_seeded(store):
    table = store.make_split("cells", test_fraction=0.2, group_key=False, random_state=3, overwrite=True)
    first = store.split_codes("cells").copy()
    store.make_split("cells", test_fraction=0.2, group_key=False, random_state=3, overwrite=True)
    np.testing.assert_array_equal(store.split_codes("cells"), first)
    store.make_split("other", test_fraction=0.2, group_key=False, random_state=4, overwrite=True)
    assert not np.array_equal(store.split_codes("other"), first)
    per_class = pd.Series(store.labels["cell_type"]).value_counts()
    np.testing.assert_array_equal(table["test"].loc[per_class.index], np.round(per_class * 0.2))  # exact per class
    donors = store.make_split("d1", test_fraction=0.2, random_state=1, overwrite=True)
    assert donors.sum().sum() == 3000
    store.make_split("d2", test_fraction=0.2, random_state=2, overwrite=True)
    assert not np.array_equal(store.split_codes("d1"), store.split_codes("d2"))


def test_loader_visits_every_cell_once_and_reads_true_counts(store):
    store.make_split("default", test_fraction=0.2, random_state=0, overwrite=True)
    train = store.split_rows("default", "train")
    adata = store.to_adata()
    loader = store.loader(batch_size=128, split="train", random_state=7)
    seen = []
    for batch in loader:
        index = batch["index"].numpy()
        seen.append(index)
        np.testing.assert_array_equal(batch["X"].numpy(), adata.X[index].toarray())
        np.testing.assert_array_equal(batch["labels"]["cell_subtype"].numpy(),
                                      adata.obs["cell_subtype"].cat.codes.to_numpy()[index])  # fmt: skip
        np.testing.assert_allclose(batch["library_size"].numpy(), adata.obs["library_size"].to_numpy()[index])
        assert len(index) <= 128
    seen = np.concatenate(seen)
    assert len(seen) == len(train)
    np.testing.assert_array_equal(np.sort(seen), train)
    assert not np.array_equal(seen, train)  # shuffled
    again = np.concatenate([b["index"].numpy() for b in store.loader(batch_size=128, split="train", random_state=7)])
    np.testing.assert_array_equal(again, seen)  # seeded
    loader.set_epoch(1)
    other_epoch = np.concatenate([b["index"].numpy() for b in loader])
    assert not np.array_equal(other_epoch, seen)


def test_balanced_sampling_hits_the_target_distribution(store):
    codes = store.labels["cell_type"].codes
    counts = np.bincount(codes)
    for balance, exponent in (("inverse", 1.0), ("sqrt", 0.5)):
        drawn = []
        loader = store.loader(batch_size=256, split=None, balance=balance, label_key="cell_type")
        for epoch in range(5):
            loader.set_epoch(epoch)
            drawn.append(np.concatenate([b["labels"]["cell_type"].numpy() for b in loader]))
        drawn = np.concatenate(drawn)
        target = counts ** (1 - exponent) / (counts ** (1 - exponent)).sum()
        np.testing.assert_allclose(np.bincount(drawn) / len(drawn), target, atol=0.02)
        assert abs(len(drawn) / 5 - store.n_obs) < 0.05 * store.n_obs  # about one split's worth per epoch


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_share_the_epoch(store, method):
    loader = store.loader(batch_size=100, split=None, num_workers=2, worker_start_method=method)
    seen = np.concatenate([b["index"].numpy() for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(store.n_obs))


def test_resume_mid_epoch(store):
    full = [b["index"].numpy() for b in store.loader(batch_size=100, split=None, random_state=2)]
    rest = [b["index"].numpy() for b in store.loader(batch_size=100, split=None, random_state=2, start_batch=7)]
    assert len(rest) == len(full) - 7
    for a, b in zip(full[7:], rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_global_batches_do_not_depend_on_the_number_of_ranks(store):
    """Each step holds the same cells with 1, 2 or 3 ranks; each rank reads only its own blocks."""
    rows = store.split_rows("default", "train")
    loader = store.loader(100, rows=rows, balance="sqrt", label_key="cell_type", random_state=3,
                          block_size=32, fetch_blocks=4, distributed="global")  # fmt: skip
    dataset = loader.dataset
    dataset.set_epoch(2)
    single = [whole for _, _, wholes in dataset.plan_global(0, 1) for whole in wholes]
    assert [len(b) for b in single] == [len(b) for _, batches in dataset.plan(0, 1) for b in batches]
    for world in (2, 3):
        plans = [dataset.plan_global(rank, world) for rank in range(world)]
        steps = [[part for _, parts, _ in plan for part in parts] for plan in plans]
        wholes = [whole for _, _, w in plans[0] for whole in w]
        assert len(wholes) == len(single)
        for step, whole in enumerate(wholes):
            np.testing.assert_array_equal(whole, single[step])
            together = np.concatenate([steps[rank][step] for rank in range(world)])
            np.testing.assert_array_equal(np.sort(together), np.sort(whole))
        for plan in plans:  # reads: the rank's own blocks (and a few carried cells), not the others'
            read = np.concatenate([rows for rows, _, _ in plan])
            assert len(read) < 1.3 * len(np.concatenate(single)) / world
    assert len(loader) == len(single)


def test_global_batches_keep_their_order_with_workers(store):
    """With DataLoader workers, whole fetches go to workers in turn and the steps still come in planned order."""
    kwargs = {"split": None, "random_state": 1, "block_size": 64, "fetch_blocks": 2, "distributed": "global"}
    alone = [b["index"].numpy() for b in store.loader(100, **kwargs)]
    workers = [b["index"].numpy() for b in store.loader(100, num_workers=2, **kwargs)]
    assert len(alone) == len(workers) == 30
    for a, b in zip(alone, workers, strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = store.loader(100, start_batch=7, **kwargs)
    np.testing.assert_array_equal(np.concatenate([b["global_index"].numpy() for b in resumed]),
                                  np.concatenate(alone[7:]))  # fmt: skip


def test_sparse_batches_and_unshuffled_order(store):
    batch = next(iter(store.loader(batch_size=50, split=None, shuffle=False, dense=False)))
    assert batch["X"].layout == __import__("torch").sparse_csr
    np.testing.assert_array_equal(batch["index"].numpy(), np.arange(50))
    with pytest.raises(ValueError, match="balance must be"):
        store.loader(balance="equal")
    with pytest.raises(KeyError, match="No split 'nope'"):
        store.loader(split="nope:train")


def test_append_extends_a_finished_store(tmp_path):
    first = cm.datasets.synthetic(400, 100, random_state=1, progress=False)
    more = cm.datasets.synthetic(250, 100, random_state=2, progress=False)
    more.obs_names = [f"m{i}" for i in range(250)]
    store = cm.pp.build_store(first, tmp_path / "s.zarr", label_keys=["cell_type"], batch_cells=128, progress=False)
    assert store.split_codes("default").tolist().count(2) == 40  # made by build_store: 10% test, stratified
    store.append(more)
    assert store.n_obs == 650
    assert store.complete
    got = store.to_adata()
    assert (got.X != ad.concat([first, more]).X).nnz == 0
    assert (store.split_codes("default")[400:] == -1).all()  # appended cells join no part
    store.verify()


BUILD = textwrap.dedent(
    """
    import sys
    import cellmint as cm
    print("ready", flush=True)
    cm.pp.build_store(sys.argv[1], sys.argv[2], label_keys=["cell_type"], group_key="donor", batch_cells=200,
                      progress=False)
    print("done", flush=True)
    """
)


def test_sigkill_at_random_points_then_resume(tmp_path):
    source = tmp_path / "input.h5ad"
    cm.datasets.synthetic(20_000, 300, random_state=5, path=source, progress=False).file.close()
    reference = cm.pp.build_store(source, tmp_path / "ref.zarr", label_keys=["cell_type"], group_key="donor",
                                  batch_cells=200, progress=False).to_adata()  # fmt: skip
    target = tmp_path / "killed.zarr"
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(8):
        with subprocess.Popen([sys.executable, "-c", BUILD, str(source), str(target)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "CELLMINT_PROGRESS": "0"}) as child:  # fmt: skip
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                kills += 1
            child.wait()
        if kills >= 5:
            break
    assert kills >= 5
    store = cm.pp.build_store(source, target, label_keys=["cell_type"], group_key="donor", batch_cells=200,
                              progress=False)  # fmt: skip
    store.verify()
    got = store.to_adata()
    assert (got.X != reference.X).nnz == 0
    assert list(got.obs_names) == list(reference.obs_names)
    assert (got.obs["cell_type"] == reference.obs["cell_type"]).all()
