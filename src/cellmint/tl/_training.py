"""The training loop, written once: ``train_annotator`` and ``train_perturbation`` supply a plan, the loop the rest.

In the shape of scvi-tools' ``TrainRunner`` / ``TrainingPlan``, but ours. A model's
:class:`TrainingPlan` says what its network and optimizer are, what one epoch's batches are, what a
step is (its loss on a batch) and how an epoch is validated (its metrics). :func:`fit` owns
everything around them:

- the seeded random streams (:func:`seeded`: torch's global generators forked, so the caller's are
  untouched, and seeded by ``random_state``);
- device placement: the network is moved to the training device before its optimizer is made;
- epochs and steps: ``zero_grad`` → ``backward`` → the gradients summed over ranks
  (:class:`~cellmint.tl._distributed.Ranks`) → the optimizer's step;
- progress (:class:`Progress`): the bar, one log line per epoch, the estimate of a long run;
- the cells of the resource report (:class:`~cellmint._utils._resources.ResourceMonitor`);
- early stopping on a named score with patience, and the best weights (:class:`EarlyStopping`);
- the checkpoint hooks (:class:`~cellmint.tl._checkpoint.Checkpoints`): resume, a checkpoint when
  one is due, and one when training ends.

The state carried from step to step is :class:`~cellmint.tl._checkpoint.TrainingState`, the one a
checkpoint holds.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .._utils import _logging as logg
from .._utils._progress import format_duration, progress_bar
from ._checkpoint import Checkpoints, RandomStreams, TrainingState
from ._distributed import CPU, Ranks

#: batches of the first epoch timed for the estimate of the whole run, after WARMUP_BATCHES untimed ones (the
#: first batches pay one-off costs: 6x the later ones on CBMC; an epoch shorter than both is timed whole)
WARMUP_BATCHES, TIMED_BATCHES = 5, 20


@contextmanager
def seeded(random_state: int, device: torch.device) -> Iterator[torch.Generator]:
    """Torch's global generators (the CPU's and ``device``'s) forked and seeded; a local generator seeded alike.

    Inside, the initial weights and the dropout draws follow ``random_state``; the caller's random
    state is restored on leaving.
    """
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(random_state)
        yield torch.Generator().manual_seed(random_state)


@dataclass(frozen=True)
class EarlyStopping:
    """Which epoch is the best, and when training stops: a named score of the epoch's metrics, with patience.

    An epoch is better when its ``score`` beats the best by more than ``tolerance``; among epochs
    within ``tolerance`` of the best, a lower ``tie_break`` (another metric) wins. Patience counts
    the epochs since the last better score (with ``tie_break_resets``, a lower ``tie_break`` resets
    it too); training stops when it reaches ``patience`` (``None``: never early).
    """

    score: str
    mode: Literal["min", "max"] = "min"
    patience: int | None = None
    tolerance: float = 0.0
    tie_break: str | None = None
    tie_break_resets: bool = False

    @property
    def worst(self) -> tuple[float, float]:
        """The ``(score, tie_break)`` every epoch beats."""
        return (-math.inf if self.mode == "max" else math.inf, math.inf)

    def judge(self, metrics: dict, best: tuple[float, float]) -> tuple[bool, bool, tuple[float, float]]:
        """Whether an epoch with ``metrics`` is the new best, whether it resets patience, and its ``(score, tie)``."""
        score = metrics[self.score]
        tie = metrics[self.tie_break] if self.tie_break is not None else math.inf
        if self.mode == "max":
            better = score > best[0] + self.tolerance
        else:
            better = score < best[0] - self.tolerance
        lower_tie = self.tie_break is not None and tie < best[1]
        is_best = better or (abs(score - best[0]) <= self.tolerance and lower_tie)
        return is_best, better or (self.tie_break_resets and lower_tie), (score, tie)

    def stops(self, stale: int) -> bool:
        return bool(self.patience and stale >= self.patience)

    def best_epoch(self, history: list[dict], best: tuple[float, float]) -> int:
        """The first epoch of ``history`` whose scores are ``best``; -1 when none is (the untrained network)."""
        for entry in history:
            if (entry[self.score], entry[self.tie_break] if self.tie_break is not None else math.inf) == tuple(best):
                return entry["epoch"]
        return -1


class TrainingPlan(ABC):
    """What a model supplies to :func:`fit`: its network, optimizer, batches, step and validation metrics.

    Subclasses set ``net`` (built on the CPU; :func:`fit` moves it to the device) and
    ``steps_per_epoch``, and implement :meth:`configure_optimizer`, :meth:`batches`,
    :meth:`training_step`, :meth:`batch_cells` and :meth:`validation_metrics`; the other methods have
    defaults. :func:`fit` sets ``optimizer``.
    """

    net: torch.nn.Module
    optimizer: Any  # zero_grad(), step(), state_dict(), load_state_dict(); ``params`` or ``param_groups``
    steps_per_epoch: int

    @abstractmethod
    def configure_optimizer(self) -> Any:
        """The optimizer of ``net``'s parameters, made once the network is on its device."""

    @abstractmethod
    def batches(self, epoch: int, start: int) -> Iterable:
        """The batches of ``epoch`` from its step ``start`` on (drawn as they are iterated)."""

    @abstractmethod
    def training_step(self, batch) -> torch.Tensor:
        """The loss on ``batch`` (this rank's share of the global batch's loss), ready for ``backward``."""

    @abstractmethod
    def batch_cells(self, batch) -> int:
        """Cells of ``batch`` (of the global batch, on every rank), for the throughput and the resource report."""

    @abstractmethod
    def validation_metrics(self) -> dict[str, float]:
        """The metrics of the network as it is now (called on every rank; rank 0's are kept)."""

    def untrained_metrics(self) -> dict[str, float]:
        """The metrics of the untrained network, when it competes for the best epoch (``keep_untrained``)."""
        return self.validation_metrics()

    def postfix(self, entry: dict) -> dict[str, str]:
        """What the progress bar shows of an epoch's ``entry`` besides its epoch and loss."""
        return {}

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients are summed over ranks."""
        if hasattr(self.optimizer, "params"):
            return self.optimizer.params
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class Progress:
    """How a run shows itself: the bar, one log line per epoch, the estimate of how long it takes.

    ``show`` is the trainers' ``progress`` argument. ``score_label``: log each epoch's loss and
    score under this name (info when no bar is drawn, debug beside a bar); ``None``, no epoch
    lines. ``cells``: the training cells, to announce after the first batches how long the run will
    take at most (as a warning when it is over ``long_run_s`` on a CPU); ``None``, no estimate.
    """

    show: bool | None = None
    desc: str = "training"
    unit: str = "batch"
    score_label: str | None = None
    cells: int | None = None
    long_run_s: float = 600


#: the defaults of :func:`fit`: a bar when someone watches, no epoch lines, no estimate; one process
AUTO, ONE_PROCESS = Progress(), Ranks()


@dataclass
class Fit:
    """What :func:`fit` leaves besides the network (which holds the best weights)."""

    state: TrainingState
    best_epoch: int = -1  # -1: the untrained network was kept
    untrained: dict = field(default_factory=dict)  # its metrics, with keep_untrained
    seconds: float = 0.0  # of the epoch loop in this process
    cells: int = 0  # cells of the global batches this process trained on

    @property
    def history(self) -> list[dict]:
        return self.state.history


def fit(
    plan: TrainingPlan,
    *,
    device: torch.device = CPU,
    max_epochs: int,
    stopping: EarlyStopping,
    progress: Progress = AUTO,
    ranks: Ranks = ONE_PROCESS,
    checkpoints: Checkpoints | None = None,
    streams: RandomStreams | None = None,
    random_state: int = 0,
    monitor: Any = None,
    keep_untrained: bool = False,
) -> Fit:
    """Train ``plan``'s network on ``device`` for up to ``max_epochs`` epochs and load its best weights into it.

    Run inside :func:`seeded` (and, for checkpoints, inside ``with checkpoints:``). ``streams``: the
    random generators a checkpoint saves and a resume restores; ``monitor``: a started
    :class:`~cellmint._utils._resources.ResourceMonitor` counting the trained cells. With
    ``keep_untrained`` the untrained network competes for the best epoch (its metrics are the
    starting best, its weights the starting best state). Every rank calls this alike; rank 0's
    metrics decide for all.
    """
    plan.net = plan.net.to(device)
    plan.optimizer = plan.configure_optimizer()
    checkpoints = checkpoints if checkpoints is not None else Checkpoints(None, {}, "1 epoch", ranks)
    state = checkpoints.resume(plan.net, plan.optimizer, streams, random_state)
    run = Fit(state, best_epoch=stopping.best_epoch(state.history, state.best) if state.resumed else -1)
    if not state.resumed:
        state.best = stopping.worst
        if keep_untrained:
            state.best_state = copy.deepcopy(plan.net.state_dict())
            run.untrained = plan.untrained_metrics()
            if stopping.score in run.untrained:
                state.best = stopping.judge(run.untrained, stopping.worst)[2]
    per_epoch = plan.steps_per_epoch
    clock = _Clock(progress, device, per_epoch, state.epoch, max_epochs, timed=ranks.main)
    # one bar over every step of every epoch (ETA for the whole run), the epoch and scores beside it
    with progress_bar(total=max_epochs * per_epoch, desc=progress.desc, unit=progress.unit,
                      progress=progress.show if ranks.main else False) as bar:  # fmt: skip
        if state.epoch or state.step:
            bar.update(min(state.epoch, max_epochs) * per_epoch + state.step)
        for epoch in range(state.epoch, state.epoch if state.done else max_epochs):
            plan.net.train()
            for batch in plan.batches(epoch, state.step):
                run.cells += _step(plan, batch, state, ranks, checkpoints, streams, monitor)
                bar.update(1)
                clock.step()
            if streams is not None:
                streams.settle()
            clock.epoch_end()
            # one decision, taken alike on every rank
            metrics, save = ranks.from_main((plan.validation_metrics(), checkpoints.due(epoch_end=True)))
            entry = {"epoch": epoch, "loss": float(state.loss) / max(1, state.batches), **metrics}
            state.history.append(entry)
            bar.set_postfix(epoch=epoch + 1, loss=f"{entry['loss']:.3f}", **plan.postfix(entry))
            if ranks.main and progress.score_label is not None:
                clock.log_epoch(epoch, max_epochs, entry["loss"], entry[stopping.score], quiet=not bar.disable)
            is_best, resets, scores = stopping.judge(entry, state.best)
            if is_best:
                state.best, state.best_state, run.best_epoch = scores, copy.deepcopy(plan.net.state_dict()), epoch
            state.stale = 0 if resets else state.stale + 1
            state.epoch, state.step, state.loss, state.batches = epoch + 1, 0, 0.0, 0
            state.done = stopping.stops(state.stale) or state.epoch >= max_epochs
            if save or state.done:  # the last one: a resumed run only does what follows training
                checkpoints.save(state, plan.net, plan.optimizer, streams)
            if state.done:
                break
    run.seconds = clock.elapsed()
    plan.net.load_state_dict(state.best_state)
    return run


def _step(plan: TrainingPlan, batch, state: TrainingState, ranks: Ranks, checkpoints: Checkpoints,
          streams: RandomStreams | None, monitor) -> int:  # fmt: skip
    """One optimisation step on ``batch``, counted in ``state`` (and checkpointed when due); its cells."""
    if streams is not None:
        streams.settle()  # resumed mid-epoch: the saved draws continue from here
    loss = plan.training_step(batch)
    plan.optimizer.zero_grad()
    loss.backward()
    # the global batch's loss; a checkpoint is due when any rank says so (rank 0's clock)
    step_loss, save = ranks.sum_gradients(plan.params, loss, checkpoints.due(epoch_end=False))
    # summed in float64 where the loss is (a device tensor in one process): read once per epoch, not per step
    state.loss = state.loss + (step_loss.double() if torch.is_tensor(step_loss) else step_loss)
    plan.optimizer.step()
    state.step, state.batches = state.step + 1, state.batches + 1
    cells = plan.batch_cells(batch)
    if monitor is not None:
        monitor.add_cells(cells)
    if save:
        state.loss = float(state.loss)
        checkpoints.save(state, plan.net, plan.optimizer, streams)
    return cells


class _Clock:
    """The run's timings: the estimate of how long it takes (once, after the first batches) and the epoch lines."""

    def __init__(self, progress: Progress, device: torch.device, per_epoch: int, first_epoch: int, max_epochs: int,
                 *, timed: bool):  # fmt: skip
        self.progress, self.device, self.per_epoch, self.first_epoch = progress, device, per_epoch, first_epoch
        self.epochs = max_epochs - first_epoch  # at most, in this run
        self.start, self.batches, self.warm = time.perf_counter(), 0, 0.0
        self.estimated = not timed or progress.cells is None  # the estimate: rank 0, once

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step(self) -> None:
        self.batches += 1
        if self.batches == WARMUP_BATCHES:
            self.warm = time.perf_counter()
        if not self.estimated and self.batches == WARMUP_BATCHES + TIMED_BATCHES:
            self._announce((time.perf_counter() - self.warm) / TIMED_BATCHES)

    def epoch_end(self) -> None:
        if not self.estimated and self.batches:  # epochs shorter than the warm-up and timed batches: timed whole
            self._announce(self.elapsed() / self.batches)

    def _announce(self, seconds_per_batch: float) -> None:
        """Log how long training will take at most, as a warning for a long CPU run."""
        self.estimated = True
        total = seconds_per_batch * self.per_epoch * self.epochs
        what = f"{self.epochs} epochs of {self.progress.cells:,} cells"
        device = self.device
        if device.type == "cpu" and total > self.progress.long_run_s:
            logg.warning(f"training will take up to about {format_duration(total)} on this CPU ({what}; early "
                         "stopping may end it sooner): pass device='cuda' on a machine with a GPU, or fewer "
                         "max_epochs")  # fmt: skip
        else:
            logg.info(f"    about {format_duration(total)} at most on {device} ({what})")

    def log_epoch(self, epoch: int, max_epochs: int, loss: float, score: float, *, quiet: bool) -> None:
        """One line per epoch (info when no progress bar is drawn): loss, validation score, time left at most."""
        per_epoch_s = self.elapsed() / (epoch - self.first_epoch + 1)
        left = per_epoch_s * (max_epochs - epoch - 1)
        eta = time.strftime("%H:%M", time.localtime(time.time() + left))
        (logg.debug if quiet else logg.info)(
            f"    epoch {epoch + 1}/{max_epochs}: loss {loss:.4f}, {self.progress.score_label} {score:.4f}, "
            f"{format_duration(per_epoch_s)} per epoch, at most {format_duration(left)} left (ETA {eta})"
        )
