"""The training loop of one perturbation network: sets of control cells in, an energy-distance loss out.

:func:`cellmint.tl.train_perturbation` calls :func:`fit_network` once per inner fold of the training
contexts (and once more when it needs a network trained on every context): each call trains a fresh
:class:`~cellmint.models._perturbation.PerturbationNet` around the binned average effects of its
training pairs and keeps the epoch with the lowest validation loss (the untrained network included).
The loop itself is :func:`cellmint.tl._training.fit`; this module supplies the network's step and
its validation loss (:class:`SetPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models._perturbation import PerturbationNet, energy_distance
from . import _training as training


def binned_means(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Per gene (column), the mean of each of ``bins`` equal shares of its sorted values (bins × genes).

    Shares split cells fractionally where the count is not a multiple of ``bins``, so the bins'
    average is the column mean exactly.
    """
    n = values.shape[0]
    ordered = values.sort(dim=0).values.double()
    cumulative = torch.cat([torch.zeros(1, values.shape[1], dtype=torch.float64), ordered.cumsum(0)])
    edges = torch.linspace(0, n, bins + 1, dtype=torch.float64)
    whole = edges.floor().long().clamp_max(n - 1)
    at = cumulative[whole] + (edges - whole).unsqueeze(1) * ordered[whole]  # cumulative sum up to each edge
    at[-1] = cumulative[-1]
    return ((at[1:] - at[:-1]) * (bins / n)).float()


def average_effects(values: torch.Tensor, pairs: dict, controls: dict, perturbations: list[str],
                    bins: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per perturbation, over its training contexts: the binned mean effect and the mean control mean.

    The effect of bin ``b`` is the mean of the ``b``-th share of the sorted perturbed values minus
    that of the sorted control values (per gene, within a context); averaged over the bins it is
    the mean effect (perturbed mean − control mean), the "perturbation mean" baseline. A
    perturbation without pairs here has zero effect (the caller never asks the network for it).
    """
    effects = torch.zeros(len(perturbations), bins, values.shape[1])
    control_means = torch.zeros(len(perturbations), values.shape[1])
    counts = torch.zeros(len(perturbations))
    for (c, p), rows in pairs.items():
        i = perturbations.index(p)
        control = values[controls[c]]
        effects[i] += binned_means(values[rows], bins) - binned_means(control, bins)
        control_means[i] += control.mean(0)
        counts[i] += 1
    counts = counts.clamp_min(1)
    return effects / counts.view(-1, 1, 1), control_means / counts.unsqueeze(1)


@dataclass
class Settings:
    """Everything :func:`fit_network` needs besides the data (train_perturbation's parameters)."""

    architecture: dict
    set_size: int
    sets_per_batch: int
    loss: str
    mean_weight: float
    max_epochs: int
    early_stopping: int | None
    lr: float
    weight_decay: float
    device: torch.device
    progress: bool | None = None
    monitor: object | None = None


@dataclass
class Fitted:
    """A trained network and how it got there."""

    net: PerturbationNet
    history: list = field(default_factory=list)
    best_epoch: int = -1  # -1: no epoch beat the untrained network on the validation sets
    untrained_val_loss: float = float("nan")
    validation: str = ""  # which cells chose the best epoch


def fit_network(values: torch.Tensor, controls: dict, perturbations: list[str], train_pairs: dict, val_pairs: dict,
                settings: Settings, random_state: int, *, description: str = "training") -> Fitted:  # fmt: skip
    """Train one network on ``train_pairs`` ({(context, perturbation): rows}), choosing the epoch on ``val_pairs``.

    The binned average effects it trains around are those of ``train_pairs``, so that validation
    asks what the network will be asked: contexts whose response was never seen. Without
    validation pairs the training loss chooses the epoch.
    """
    rng = np.random.default_rng(random_state)
    effects, control_means = average_effects(values, train_pairs, controls, perturbations,
                                             settings.architecture["effect_bins"])  # fmt: skip
    with training.seeded(random_state, settings.device):  # the initial weights and the dropout draws
        plan = SetPlan(values, controls, perturbations, train_pairs, val_pairs, settings, rng, effects, control_means,
                       random_state)  # fmt: skip
        # the lowest validation loss (the training loss without validation sets); the untrained network
        # competes: training is kept only where it beats its start (the binned baseline) on validation
        stopping = training.EarlyStopping("val_loss" if plan.val_keys else "loss", "min",
                                          patience=settings.early_stopping, tolerance=1e-6)  # fmt: skip
        shown = training.Progress(settings.progress, desc=description, unit="step")
        run = training.fit(plan, device=settings.device, max_epochs=settings.max_epochs, stopping=stopping,
                           progress=shown, monitor=settings.monitor, random_state=random_state,
                           keep_untrained=True)  # fmt: skip
    return Fitted(plan.net, run.history, run.best_epoch, run.untrained.get("val_loss", float("nan")))


class SetPlan(training.TrainingPlan):
    """One network's step (the set loss of a batch of drawn sets) and its validation loss on fixed sets."""

    def __init__(self, values, controls, perturbations, train_pairs, val_pairs, settings, rng, effects, control_means,
                 random_state):  # fmt: skip
        self.device, self.settings, self.rng = settings.device, settings, rng
        self.controls, self.train_pairs = controls, train_pairs
        self.keys = list(train_pairs)
        self.codes = torch.tensor([perturbations.index(p) for _, p in self.keys])
        n_perturbed = sum(len(v) for v in train_pairs.values())
        self.steps_per_epoch = max(1, -(-n_perturbed // (settings.set_size * settings.sets_per_batch)))
        net = PerturbationNet(values.shape[1], len(perturbations), **settings.architecture)
        net.binned_effect.copy_(effects)
        net.control_mean.copy_(control_means)
        if len({c for c, _ in train_pairs}) < 3:  # a slope fitted to two contexts only mirrors their difference
            net.contrast.requires_grad_(False)
        self.net = net
        self.on_device = values.to(self.device)
        self.val_keys = [k for k in val_pairs if k[1] in {p for _, p in self.keys}]
        if self.val_keys:  # fixed control and perturbed sets per validation pair, drawn once
            val_rng = np.random.default_rng(random_state + 1)
            self.val_controls = self.draw({k: controls[k[0]] for k in self.val_keys}, self.val_keys, val_rng)
            self.val_real = self.draw(val_pairs, self.val_keys, val_rng)
            self.val_codes = torch.tensor([perturbations.index(p) for _, p in self.val_keys], device=self.device)

    def configure_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.net.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def draw(self, groups: dict, picks: list, generator: np.random.Generator) -> torch.Tensor:
        """One set of ``set_size`` rows per pick (drawn again when a group has fewer cells)."""
        size = self.settings.set_size
        idx = np.stack([generator.choice(groups[k], size, replace=len(groups[k]) < size) for k in picks])
        return self.on_device[torch.as_tensor(idx, device=self.device)]

    def set_loss(self, predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        mean_term = ((predicted.mean(1) - real.mean(1)) ** 2).sum(-1)
        if self.settings.loss == "mse":
            return mean_term.mean()
        return (energy_distance(predicted, real) + self.settings.mean_weight * mean_term).mean()

    def batches(self, epoch: int, start: int):
        """Each step's training pairs, drawn at random (a set of cells of each is drawn by the step)."""
        for _ in range(start, self.steps_per_epoch):
            yield self.rng.integers(len(self.keys), size=self.settings.sets_per_batch)

    def training_step(self, picks: np.ndarray) -> torch.Tensor:
        chosen = [self.keys[i] for i in picks]
        x = self.draw({k: self.controls[k[0]] for k in chosen}, chosen, self.rng)
        y = self.draw(self.train_pairs, chosen, self.rng)
        return self.set_loss(self.net(x, self.codes[picks].to(self.device)), y)

    def batch_cells(self, picks: np.ndarray) -> int:
        return self.settings.sets_per_batch * self.settings.set_size

    def validation_metrics(self) -> dict[str, float]:
        if not self.val_keys:
            return {}
        self.net.eval()
        with torch.no_grad():
            return {"val_loss": float(self.set_loss(self.net(self.val_controls, self.val_codes), self.val_real))}

    def postfix(self, entry: dict) -> dict[str, str]:
        return {"val": f"{entry.get('val_loss', np.nan):.3f}"}
