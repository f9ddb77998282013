"""train_annotator on torch.distributed (2 CPU processes, gloo) and resumed after SIGKILL, also with fewer ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

import cellmint as cm
from _train_workers import context, digest, results, start

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

RUN = {"max_epochs": 8, "batch_size": 64}  # global batch size: the same cells per step with 1 or 2 ranks


def finish(ranks, timeout: float = 300) -> None:
    for process in ranks:
        process.join(timeout)
        assert process.exitcode == 0, f"a rank exited with {process.exitcode}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One run on 2 ranks and the same run in 1 process (the same global batch size)."""
    ctx = context()
    tmp = tmp_path_factory.mktemp("ddp")
    pair = start(ctx, 2, {**RUN, "model_dir": str(tmp / "model"), "balance": None}, tmp / "two", visits=True)
    finish(pair)
    single = start(ctx, 1, {**RUN, "balance": None}, tmp / "one")
    finish(single)
    return tmp, results(tmp / "two", 2), results(tmp / "one", 1)[0]


def test_two_ranks_train_one_model(two_ranks):
    tmp, (rank0, rank1), single = two_ranks
    # the same weights, calibration and decisions on both ranks, and one model folder that loads with them
    assert rank0["weights"] == rank1["weights"]
    for key in ("temperature", "threshold", "history", "macro_f1"):
        assert rank0[key] == rank1[key]
    loaded = cm.io.read_model(tmp / "model")
    assert digest(loaded.net.state_dict()) == rank0["weights"]
    assert loaded.manifest["training"]["world_size"] == 2
    assert loaded.manifest["training"]["resumed"] == []
    assert loaded.manifest["training"]["cells_per_s"] > 0
    assert not (tmp / "model.checkpoint").exists()  # removed once the model is written
    # metrics over every test cell (not one rank's share), as good as one process with the same global batch
    assert rank0["evaluated_on"] == "test"
    assert rank0["n_cells"] == 210
    assert abs(rank0["macro_f1"] - single["macro_f1"]) <= 0.02
    assert rank0["macro_f1"] > 0.85


def test_every_training_cell_once_per_epoch_across_ranks(two_ranks):
    _, (rank0, rank1), _ = two_ranks
    for epoch in range(2):
        seen = Counter(rank0["visits"][epoch]) + Counter(rank1["visits"][epoch])
        assert len(seen) == 300
        assert set(seen.values()) == {1}
        assert rank0["visits"][epoch]
        assert rank1["visits"][epoch]
    assert rank0["visits"][0] != rank0["visits"][1]  # a new order every epoch


def test_two_ranks_train_one_model_from_staged_counts(tmp_path):
    """Counts staged on each rank's device: the ranks share every global batch, as streaming ranks do."""
    ctx = context()
    run = {**RUN, "balance": None, "stage": True}
    pair = start(ctx, 2, run, tmp_path / "two", visits=True)
    finish(pair)
    single = start(ctx, 1, run, tmp_path / "one")
    finish(single)
    (rank0, rank1), alone = results(tmp_path / "two", 2), results(tmp_path / "one", 1)[0]
    assert [rank0["staged"], rank1["staged"], alone["staged"]] == [True, True, True]
    assert rank0["weights"] == rank1["weights"]
    for epoch in range(2):
        seen = Counter(rank0["visits"][epoch]) + Counter(rank1["visits"][epoch])
        assert len(seen) == 300
        assert set(seen.values()) == {1}
    assert abs(rank0["macro_f1"] - alone["macro_f1"]) <= 0.02
    assert rank0["macro_f1"] > 0.85


def test_kill_and_resume_gives_the_uninterrupted_model(tmp_path):
    """SIGKILL one process at random points (≥ 5 times), rerun the same call each time: the same weights."""
    ctx = context()
    run = {"max_epochs": 12, "batch_size": 32, "early_stopping": None, "checkpoint_every": "2 steps"}
    finish(start(ctx, 1, {**run, "model_dir": str(tmp_path / "plain")}, tmp_path / "plain_out"))
    uninterrupted = results(tmp_path / "plain_out", 1)[0]
    folder, checkpoint = tmp_path / "killed", tmp_path / "killed.checkpoint" / "training.pt"
    rng = np.random.default_rng(0)
    positions = []
    for attempt in range(6):
        (process,) = start(ctx, 1, {**run, "model_dir": str(folder)}, tmp_path / f"out{attempt}")
        # once this run has written a checkpoint of its own, kill it a random moment later
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        deadline = time.monotonic() + 120
        while process.is_alive() and time.monotonic() < deadline:
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        assert process.is_alive(), "training finished before it could be killed"
        process.kill()
        process.join()
        state = torch.load(checkpoint, weights_only=True)["state"]
        positions.append((state["epoch"], state["step"]))
    assert len(set(positions)) == 6
    assert positions == sorted(positions)
    assert not (folder / "manifest.json").exists()
    out = tmp_path / "resumed"
    finish(start(ctx, 1, {**run, "model_dir": str(folder)}, out))
    resumed = results(out, 1)[0]
    assert len(resumed["training"]["resumed"]) == 6
    assert resumed["weights"] == uninterrupted["weights"]
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["macro_f1"] == uninterrupted["macro_f1"]
    assert digest(cm.io.read_model(folder).net.state_dict()) == uninterrupted["weights"]
    assert not checkpoint.parent.exists()


def test_resume_two_ranks_on_two_and_on_one(tmp_path, two_ranks):
    """A 2-rank run killed mid-training, resumed by 2 ranks (the same model) and by one process (within tolerance)."""
    ctx = context()
    run = {**RUN, "balance": None, "checkpoint_every": "2 steps"}
    checkpoint = tmp_path / "model.checkpoint" / "training.pt"
    ranks = start(ctx, 2, {**run, "model_dir": str(tmp_path / "model")}, tmp_path / "two")
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for process in ranks:
        process.kill()
        process.join()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["world"] == 2
    assert saved["state"]["epoch"] < RUN["max_epochs"]
    assert saved["random"].shape[0] == 2  # each rank's random states
    assert not torch.equal(saved["random"][0], saved["random"][1])
    shutil.copytree(checkpoint.parent, tmp_path / "copy.checkpoint")
    uninterrupted = two_ranks[1][0]
    # the same number of ranks: each rank's draws continue where they stopped, the model is the same
    out = tmp_path / "two_again"
    finish(start(ctx, 2, {**run, "checkpoint_dir": str(tmp_path / "copy.checkpoint")}, out))
    again = results(out, 2)
    assert again[0]["weights"] == again[1]["weights"] == uninterrupted["weights"]
    assert again[0]["history"] == uninterrupted["history"]
    assert again[0]["training"]["resumed"][0]["from_world"] == 2
    # one rank
    out = tmp_path / "one"
    finish(start(ctx, 1, {**run, "model_dir": str(tmp_path / "model")}, out))
    resumed = results(out, 1)[0]
    (resumed_from,) = resumed["training"]["resumed"]
    assert resumed_from["world"] == 1
    assert resumed_from["from_world"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [h["epoch"] for h in uninterrupted["history"]]
    # stated tolerance (docs/scaling.md): after a change of ranks the cells of every step are the same, the
    # random draws of augmentation and dropout are the new ranks' — the model is as good, not bit-equal
    assert abs(resumed["macro_f1"] - uninterrupted["macro_f1"]) <= 0.02


def test_cellmint_train_under_torchrun_on_a_store(tmp_path):
    """The command line, unchanged, under torchrun: 2 ranks join the group from its environment; one model."""
    adata = cm.datasets.cellbench()
    adata = adata[:, adata.var["in_all"].to_numpy()].copy()
    cm.pp.build_store(adata, tmp_path / "s.zarr", label_keys=["cell_line"], progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cellmint.cli", "train", str(tmp_path / "s.zarr"), str(tmp_path / "model"),
               "--label-keys", "cell_line", "--max-epochs", "3", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CELLMINT_PROGRESS": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("saved to") == 1  # rank 0 reports
    model = cm.io.read_model(tmp_path / "model")
    assert model.manifest["training"]["world_size"] == 2
    assert model.metrics["cell_line"]["n_cells"] == model.manifest["data"]["n_test"]
    assert not (tmp_path / "model.checkpoint").exists()


def test_a_rank_without_validation_cells_gives_empty_outputs_of_every_level():
    """A rank whose share of the validation cells is empty (fewer cells than ranks) still has every level."""
    from cellmint.models._network import AnnotatorNet
    from cellmint.models._normalize import InputRecipe
    from cellmint.tl._annotation_evaluation import logits_over as _logits

    net = AnnotatorNet(30, {"coarse": 3, "fine": 7}, hidden=(16, 8), embeddings={"X_umap": 2})
    latents = []
    logits, labels, index, embedded = _logits(net, (), InputRecipe(kind="counts"), "cpu", latents)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"coarse": (0, 3), "fine": (0, 7)}
    assert {k: v.dtype for k, v in labels.items()} == {"coarse": torch.int64, "fine": torch.int64}
    assert index.shape == (0,)
    assert embedded["X_umap"].shape == (0, 2)
    assert torch.cat(latents).shape == (0, 8)
