"""Training checkpoints: resume an interrupted ``train_annotator`` call where it stopped, with any number of ranks.

A checkpoint is one file, ``training.pt`` in the checkpoint folder, replaced atomically (written
beside, flushed, renamed) by rank 0 alone — the ranks hold identical weights — so a crash at any
moment leaves the previous checkpoint or the new one. Rank 0 also holds the folder's lock for the
whole run, so that a second run of the same call (restarted while the first still runs) is refused.
The file holds the network and optimizer state, the position (epoch and global step within it), the
best weights and score so far, the patience count, the history and the running loss of the epoch,
and a fingerprint of the call (parameters and data) so that it only resumes the same training.
It is loaded with ``weights_only=True``: tensors, numbers, strings and containers only.

The order of the cells follows from ``(random_state, epoch)`` alone (:mod:`cellmint.store._sampling`,
``distributed="global"``); the random draws of augmentation and dropout come from each rank's
generators (:class:`RandomStreams`), whose states every rank sends to rank 0 for the checkpoint. A
run resumed with the same number of ranks therefore continues each rank's draws where they stopped
and redoes exactly what the uninterrupted run did. With another number of ranks every step still
holds the same cells, but the old ranks' streams cannot be dealt to the new ones: each new rank's
generators are seeded from ``(random_state, epoch, step, rank)`` — other draws, as with another seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import _logging as logg
from .._utils._files import replace_atomically
from .._utils._lock import LockBusyError, writer_lock
from ._distributed import Ranks

CHECKPOINT = "training.pt"
LOCK = "lock"
#: format of the checkpoint file; a checkpoint of another format is not resumed
CHECKPOINT_VERSION = 1
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(epochs?|steps?|min|minutes?)\s*$")


@dataclass
class TrainingState:
    """Where a training run stands: everything the loop carries from one step to the next, besides weights."""

    epoch: int = 0  # the epoch being trained
    step: int = 0  # global steps of it already done
    done: bool = False  # training has ended (early stopping or the last epoch); calibration remains
    best: tuple[float, float] = (-math.inf, math.inf)  # (validation macro-F1, validation loss) of the best epoch
    best_state: dict | None = None
    stale: int = 0  # epochs since the last better macro-F1
    history: list = field(default_factory=list)
    loss: float = 0.0  # Σ of this epoch's step losses so far
    batches: int = 0  # steps of this epoch so far
    resumed: list = field(default_factory=list)  # {"epoch", "step", "world", "from_world"} of every resume


def _seeds(*key: int) -> tuple[int, int]:
    """Two independent 63-bit seeds from ``key``: one for augmentation, one for dropout."""
    a, b = np.random.SeedSequence(list(key)).generate_state(2, np.uint64)
    return int(a >> np.uint64(1)), int(b >> np.uint64(1))


class RandomStreams:
    """The generators a training step of this rank draws from: augmentation's and dropout's (torch's own).

    Rank 0 keeps the streams of a single process, seeded by ``random_state``; the other ranks reseed
    theirs from ``(random_state, rank)`` after the weights are made (identical on every rank).
    """

    def __init__(self, generator: torch.Generator, device: torch.device, random_state: int, rank: int):
        self.generator, self.device = generator, device
        self.pending: torch.Tensor | None = None
        if rank:
            self.reseed(random_state, rank)

    def reseed(self, *key: int) -> None:
        augment, dropout = _seeds(*key)
        self.generator.manual_seed(augment)
        torch.manual_seed(dropout)  # inside the training's fork_rng: the caller's state is restored after

    def state(self) -> torch.Tensor:
        """All the states as one byte vector (the same length on every rank)."""
        parts = [self.generator.get_state(), torch.get_rng_state()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device))
        return torch.cat(parts)

    def restore(self, state: torch.Tensor, *, mid_epoch: bool) -> None:
        """Put saved states back; ``mid_epoch``: once the resumed epoch's loader has started (:meth:`settle`).

        A torch DataLoader draws a seed from torch's generator when an epoch's iteration starts: states
        saved mid-epoch come after that draw, so they are put back after the resumed epoch's draw.
        """
        if mid_epoch:
            self.pending = state
        else:
            self._set(state)

    def settle(self) -> None:
        """Put back states held by :meth:`restore` (called at every step and at the end of every epoch)."""
        if self.pending is not None:
            self._set(self.pending)
            self.pending = None

    def _set(self, state: torch.Tensor) -> None:
        n = len(self.generator.get_state())
        self.generator.set_state(state[:n].clone())
        m = n + len(torch.get_rng_state())
        torch.set_rng_state(state[n:m].clone())
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[m:].clone(), self.device)


def parse_every(every: str) -> tuple[float, str]:
    """``"2 epochs"``, ``"500 steps"`` or ``"10 min"`` → ``(2.0, "epoch")``, ``(500.0, "step")``, ``(10.0, "min")``."""
    match = _EVERY.match(str(every))
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"checkpoint_every={every!r} is not a positive count with a unit: write e.g. '1 epoch', "
                         "'500 steps' or '10 min'.")  # fmt: skip
    unit = match[2]
    return float(match[1]), "epoch" if unit.startswith("epoch") else "step" if unit.startswith("step") else "min"


def fingerprint(params: dict, arrays: dict[str, Any]) -> dict:
    """What makes two calls the same training: their parameters and a digest of each data array."""
    digests = {}
    for key, value in arrays.items():
        digest = hashlib.sha256()
        for part in value if isinstance(value, list | tuple) else [value]:
            digest.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else str(part).encode())
        digests[key] = digest.hexdigest()[:16]
    return {"params": json.loads(json.dumps(params, default=str)), "data": digests}


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value


class Checkpoints:
    """The checkpoint of one training call: load it, say when a new one is due, write it, remove it.

    ``folder=None`` turns checkpointing off (every method is then a no-op). Used as a context manager
    around the training, so that the folder's lock is let go of however training ends.
    """

    def __init__(self, folder: str | Path | None, fingerprint: dict, every: str, ranks: Ranks):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint = fingerprint
        self.every, self.unit = parse_every(every)
        self.ranks = ranks
        self.last_time, self.steps, self.epochs = time.monotonic(), 0, 0  # since the last checkpoint
        self._held: ExitStack | None = None  # the folder's writer lock, while held

    @property
    def file(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT

    def resume(self, net: torch.nn.Module, optimizer, streams: RandomStreams | None,
               random_state: int) -> TrainingState:  # fmt: skip
        """The saved state, loaded into ``net``, ``optimizer`` and ``streams``; a fresh one without a checkpoint."""
        # rank 0 reads the file and sends it: the other ranks need not see its folder (other machines)
        busy = self._lock()
        readable = self.ranks.main and busy is None and self.file is not None and self.file.is_file()
        payload = self.file.read_bytes() if readable else None
        busy, payload = self.ranks.from_main((busy, payload))
        if busy is not None:  # on every rank: none goes on training alone
            raise LockBusyError(f"{busy} (Another checkpoint_dir would train from the start.)")
        if payload is None:
            return TrainingState()
        try:
            saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file gets the same advice
            raise ValueError(f"The training checkpoint {self.file} cannot be read ({err}). Delete the folder "
                             f"{self.folder} to train from the start.") from err  # fmt: skip
        if saved.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"The training checkpoint {self.file} has format {saved.get('version')!r}; this "
                f"cellmint writes {CHECKPOINT_VERSION}. Delete {self.folder} to train from the start."
            )
        if saved["fingerprint"] != self.fingerprint:
            mine, theirs = self.fingerprint, saved["fingerprint"]
            changed = sorted({k for k in set(mine["params"]) | set(theirs["params"])
                              if mine["params"].get(k) != theirs["params"].get(k)}
                             | {f"data:{k}" for k in set(mine["data"]) | set(theirs["data"])
                                if mine["data"].get(k) != theirs["data"].get(k)})  # fmt: skip
            raise ValueError(f"The training checkpoint in {self.folder} belongs to another training call (it differs "
                             f"in {changed}). Rerun the same call to resume it, or delete {self.folder} (or pass "
                             "another checkpoint_dir) to train from the start.")  # fmt: skip
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainingState(**saved["state"])
        random = saved.get("random")
        if streams is None:  # a training without random streams of its own: nothing to restore
            pass
        elif random is not None and len(random) == self.ranks.world and random.shape[1] == len(streams.state()):
            streams.restore(random[self.ranks.rank], mid_epoch=state.step > 0)  # each rank continues its draws
        else:  # another number of ranks (or devices): the same cells per step, new draws (module docstring)
            streams.reseed(random_state, state.epoch, state.step, self.ranks.rank)
        state.best = tuple(state.best)
        state.resumed = [*state.resumed, {"epoch": state.epoch, "step": state.step, "world": self.ranks.world,
                                          "from_world": int(saved["world"])}]  # fmt: skip
        logg.info(f"    resuming from {self.file}: epoch {state.epoch}, step {state.step}"
                  f"{' (training done)' if state.done else ''}")  # fmt: skip
        return state

    def _lock(self) -> str | None:
        """Take the folder's writer lock (rank 0, until :meth:`release`); the refusal's message when another holds it.

        The lock of :mod:`cellmint._utils._lock`, as for stores and model folders: released by the
        system when the process ends, however it ends.
        """
        if self.folder is None or not self.ranks.main:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        held = ExitStack()
        try:
            held.enter_context(writer_lock(self.folder / LOCK, what=f"the training checkpoint folder {self.folder}"))
        except LockBusyError as err:
            return str(err)
        self._held = held
        return None

    def due(self, *, epoch_end: bool) -> bool:
        """Whether a checkpoint is due now (asked after every step, and again at the end of every epoch)."""
        if self.folder is None:
            return False
        if self.unit == "epoch":
            self.epochs += epoch_end
            return epoch_end and self.epochs >= self.every
        if self.unit == "step":
            self.steps += not epoch_end
            return not epoch_end and self.steps >= self.every
        return time.monotonic() - self.last_time >= 60 * self.every

    def save(self, state: TrainingState, net: torch.nn.Module, optimizer, streams: RandomStreams | None) -> None:
        """Write the checkpoint atomically: every rank sends its random states, rank 0 writes the rest.

        Called on every rank at the same step (the ranks hold the same weights and state).
        """
        self.last_time, self.steps, self.epochs = time.monotonic(), 0, 0
        if self.folder is None:
            return
        random = None if streams is None else self.ranks.gather(streams.state()[None]).cpu()
        if not self.ranks.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "world": self.ranks.world,
                   "state": _cpu(asdict(state)), "net": _cpu(net.state_dict()),
                   "optimizer": _cpu(optimizer.state_dict()), "random": random}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        replace_atomically(self.file, buffer.getvalue())

    def clear(self) -> None:
        """Remove the checkpoint folder once the model it led to is returned (rank 0)."""
        self.release()
        if self.folder is not None and self.ranks.main and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        """Let go of the folder's lock."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # however the run ends: a rerun in this process must not find its own lock


def checkpoint_folder(checkpoint_dir: str | Path | None, model_dir: str | Path | None) -> Path | None:
    """``checkpoint_dir``; else ``<model_dir>.checkpoint`` beside the model folder; else none.

    Beside, not inside: the model folder is replaced whole when the model is written, and a previous
    model in it stays untouched (and loadable) while its successor trains.
    """
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    if model_dir is not None:
        model_dir = Path(model_dir)
        return model_dir.with_name(f"{model_dir.name}.checkpoint")
    return None
