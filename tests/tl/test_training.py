"""The shared training loop (tl/_training.py) on a toy plan: early stopping, best weights, seeding, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from cellmint.tl import _training as training
from cellmint.tl._checkpoint import Checkpoints
from cellmint.tl._distributed import Ranks


class Toy(training.TrainingPlan):
    """A linear map fitted to noise-free targets; the validation metrics are scripted per epoch when given."""

    def __init__(self, scripted: list[dict] | None = None, steps: int = 3):
        self.net = torch.nn.Linear(4, 1)
        self.steps_per_epoch, self.scripted, self.epoch = steps, scripted, -1
        self.x = torch.randn(32, 4)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def configure_optimizer(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def batches(self, epoch, start):
        self.epoch = epoch
        return range(start, self.steps_per_epoch)

    def training_step(self, batch):
        rows = torch.randint(0, 32, (8,))
        return ((self.net(self.x[rows]) - self.y[rows]) ** 2).mean()

    def batch_cells(self, batch):
        return 8

    def validation_metrics(self):
        if self.scripted is not None:
            return dict(self.scripted[self.epoch]) if self.epoch >= 0 else {"val_loss": 5.0}
        with torch.no_grad():
            return {"val_loss": float(((self.net(self.x) - self.y) ** 2).mean())}


def test_the_annotator_rule_ties_go_to_the_lower_loss_and_patience_counts_better_scores():
    rule = training.EarlyStopping("f1", "max", patience=2, tolerance=1e-9, tie_break="loss")
    best = rule.worst
    assert best == (-math.inf, math.inf)
    assert rule.judge({"f1": 0.5, "loss": 1.0}, best) == (True, True, (0.5, 1.0))
    # an equal score with a lower loss is the new best, but does not reset patience
    assert rule.judge({"f1": 0.5, "loss": 0.9}, (0.5, 1.0)) == (True, False, (0.5, 0.9))
    assert rule.judge({"f1": 0.5 + 1e-10, "loss": 1.1}, (0.5, 1.0))[:2] == (False, False)
    # with embedding heads a lower loss resets patience too
    heads = training.EarlyStopping("f1", "max", patience=2, tolerance=1e-9, tie_break="loss", tie_break_resets=True)
    assert heads.judge({"f1": 0.4, "loss": 0.5}, (0.5, 1.0)) == (False, True, (0.4, 0.5))
    assert not rule.stops(1)
    assert rule.stops(2)
    assert not training.EarlyStopping("f1", "max").stops(100)  # patience None: all epochs


def test_fit_stops_on_patience_and_keeps_the_best_epoch():
    scripted = [{"val_loss": v} for v in (4.0, 3.0, 3.5, 3.0 - 1e-7, 3.2, 1.0)]
    with training.seeded(0, torch.device("cpu")):
        plan = Toy(scripted)
        run = training.fit(plan, max_epochs=6, progress=training.Progress(False),
                           stopping=training.EarlyStopping("val_loss", patience=3, tolerance=1e-6))  # fmt: skip
    # epoch 3 is within the tolerance of epoch 1: not better; three epochs without a better one stop training
    assert [h["epoch"] for h in run.history] == [0, 1, 2, 3, 4]
    assert run.best_epoch == 1
    assert run.state.best == (3.0, math.inf)
    assert run.cells == 5 * 3 * 8
    assert set(run.history[0]) == {"epoch", "loss", "val_loss"}


def test_the_untrained_network_competes_and_the_best_weights_are_loaded():
    scripted = [{"val_loss": v} for v in (6.0, 7.0)]
    with training.seeded(0, torch.device("cpu")):
        plan = Toy(scripted)
        untrained = {k: v.clone() for k, v in plan.net.state_dict().items()}
        run = training.fit(plan, max_epochs=2, stopping=training.EarlyStopping("val_loss"),
                           progress=training.Progress(False), keep_untrained=True)  # fmt: skip
    assert run.untrained == {"val_loss": 5.0}
    assert run.best_epoch == -1
    for key, value in plan.net.state_dict().items():
        torch.testing.assert_close(value, untrained[key], rtol=0, atol=0)


def test_seeded_runs_are_identical_and_leave_the_callers_random_state_alone():
    def trained():
        with training.seeded(3, torch.device("cpu")):
            plan = Toy()
            training.fit(plan, max_epochs=3, stopping=training.EarlyStopping("val_loss"),
                         progress=training.Progress(False))  # fmt: skip
        return plan.net.state_dict()

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = trained(), trained()
    assert torch.equal(torch.get_rng_state(), before)
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)


def test_a_checkpoint_is_written_when_due_and_when_training_ends(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck", {"params": {}, "data": {}}, "2 steps", Ranks())
    saved = []
    real = checkpoints.save
    checkpoints.save = lambda state, *args: saved.append((state.epoch, state.step, state.done)) or real(state, *args)
    with training.seeded(0, torch.device("cpu")), checkpoints:
        run = training.fit(Toy(steps=3), max_epochs=2, stopping=training.EarlyStopping("val_loss"),
                           progress=training.Progress(False), checkpoints=checkpoints)  # fmt: skip
    assert saved == [(0, 2, False), (1, 1, False), (1, 3, False), (2, 0, True)]
    assert (tmp_path / "ck" / "training.pt").is_file()
    # the same call again resumes a finished run: no more epochs, the same history
    with training.seeded(0, torch.device("cpu")), checkpoints:
        again = training.fit(Toy(steps=3), max_epochs=2, stopping=training.EarlyStopping("val_loss"),
                             progress=training.Progress(False), checkpoints=checkpoints)  # fmt: skip
    assert again.history == run.history
    assert again.state.resumed
    assert again.best_epoch == run.best_epoch


@pytest.mark.parametrize("cells", [None, 100])
def test_the_estimate_and_epoch_lines_are_logged_only_when_asked(cells):
    import io

    import scanpy as sc

    old_verbosity, old_file = sc.settings.verbosity, sc.settings.logfile
    buffer = io.StringIO()
    sc.settings.logfile, sc.settings.verbosity = buffer, "info"
    label = None if cells is None else "validation loss"
    try:
        with training.seeded(0, torch.device("cpu")):
            training.fit(Toy(steps=2), max_epochs=2, stopping=training.EarlyStopping("val_loss"),
                         progress=training.Progress(False, score_label=label, cells=cells))  # fmt: skip
    finally:
        sc.settings.verbosity, sc.settings.logfile = old_verbosity, old_file
    text = buffer.getvalue()
    assert (text.count("at most on cpu (2 epochs of 100 cells)") == 1) == (cells is not None)
    assert ("epoch 2/2: loss" in text and "validation loss" in text) == (cells is not None)
