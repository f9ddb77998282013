"""Training checkpoints in one process: an interrupted call resumes to the same model; other calls are refused."""

from __future__ import annotations

import fcntl

import numpy as np
import pytest
import torch

import cellmint as cm
from cellmint.store import LockBusyError
from cellmint.tl import _annotation_evaluation
from cellmint.tl._checkpoint import parse_every

RUN = {"hidden": (32,), "max_epochs": 5, "early_stopping": None, "lr": 1e-3, "batch_size": 32, "progress": False}


@pytest.fixture(scope="module")
def adata():
    data = cm.datasets.cellbench()[::3].copy()
    return data[:, np.asarray(data.X.sum(0)).ravel() > 20].copy()


def interrupted(adata, monkeypatch, after_epochs: int, **kwargs):
    """Run training until the validation of epoch ``after_epochs`` fails (as a crash would)."""
    calls = {"n": 0}
    real = _annotation_evaluation.macro_f1

    def failing(*args):
        calls["n"] += 1
        if calls["n"] > after_epochs:
            raise KeyboardInterrupt("pre-empted")
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(_annotation_evaluation, "macro_f1", failing)
        with pytest.raises(KeyboardInterrupt):
            cm.tl.train_annotator(adata, "cell_line", **{**RUN, **kwargs})


def test_rerunning_the_same_call_resumes_to_the_same_model(adata, tmp_path, monkeypatch):
    plain = cm.tl.train_annotator(adata.copy(), "cell_line", model_dir=tmp_path / "plain", **RUN)
    folder = tmp_path / "model"
    interrupted(adata.copy(), monkeypatch, 2, model_dir=folder, checkpoint_every="3 steps")
    saved = torch.load(tmp_path / "model.checkpoint" / "training.pt", weights_only=True)
    # it failed validating epoch 2: the last checkpoint is from within that epoch, a few steps before its end
    assert saved["state"]["epoch"] == 2
    assert saved["state"]["step"] > 0
    assert not (folder / "manifest.json").exists()
    resumed = cm.tl.train_annotator(adata.copy(), "cell_line", model_dir=folder, checkpoint_every="3 steps", **RUN)
    for key, value in plain.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.manifest["history"] == plain.manifest["history"]
    assert resumed.manifest["training"]["resumed"] == [
        {"epoch": 2, "step": saved["state"]["step"], "world": 1, "from_world": 1}
    ]
    assert resumed.temperature == plain.temperature
    assert not (tmp_path / "model.checkpoint").exists()


def test_a_checkpoint_of_another_call_or_in_use_is_refused(adata, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    interrupted(adata, monkeypatch, 1, checkpoint_dir=folder, checkpoint_every="1 epoch")
    with pytest.raises(ValueError, match=r"belongs to another training call \(it differs in \['lr'\]\)"):
        cm.tl.train_annotator(adata, "cell_line", checkpoint_dir=folder, **{**RUN, "lr": 1e-2})
    with pytest.raises(ValueError, match=r"differs in \[.*'data:rows'"):
        cm.tl.train_annotator(adata[:-5].copy(), "cell_line", checkpoint_dir=folder, **RUN)
    with open(folder / "lock", "a") as other:  # another process's run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LockBusyError, match="checkpoint folder .* is being written by another process"):
            cm.tl.train_annotator(adata, "cell_line", checkpoint_dir=folder, **RUN)
    model = cm.tl.train_annotator(adata, "cell_line", checkpoint_dir=folder, **RUN)  # the same call: resumed
    assert model.manifest["training"]["resumed"][0]["epoch"] == 1
    assert not folder.exists()


@pytest.mark.parametrize("every", ["", "5", "0 steps", "two epochs", "10 hours"])
def test_checkpoint_every_needs_a_count_and_a_unit(every):
    with pytest.raises(ValueError, match="checkpoint_every"):
        parse_every(every)
    assert parse_every("2 epochs") == (2.0, "epoch")
    assert parse_every("500 steps") == (500.0, "step")
    assert parse_every("7.5 min") == (7.5, "min")
