"""The training loop of one perturbation network: sets of control cells in, an energy-distance loss out.

:func:`cellmint.tl.train_perturbation` calls :func:`fit_network` once per inner fold of the training
contexts (and once more when it needs a network trained on every context): each call trains a fresh
:class:`~cellmint.models._perturbation.PerturbationNet` around the binned average effects of its
training pairs and keeps the epoch with the lowest validation loss (the untrained network included).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from .._utils._progress import progress_bar
from ..models._perturbation import PerturbationNet, energy_distance


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
    with torch.random.fork_rng(devices=[]):  # the initial weights and the dropout draws: a seeded local stream
        torch.manual_seed(random_state)
        return _train(values, controls, perturbations, train_pairs, val_pairs, settings, rng, effects, control_means,
                      description, random_state)  # fmt: skip


def _train(values, controls, perturbations, train_pairs, val_pairs, settings, rng, effects, control_means,
           description, random_state) -> Fitted:  # fmt: skip
    device = settings.device
    keys = list(train_pairs)
    codes = torch.tensor([perturbations.index(p) for _, p in keys])
    n_perturbed = sum(len(v) for v in train_pairs.values())
    steps = max(1, -(-n_perturbed // (settings.set_size * settings.sets_per_batch)))
    net = PerturbationNet(values.shape[1], len(perturbations), **settings.architecture)
    net.binned_effect.copy_(effects)
    net.control_mean.copy_(control_means)
    if len({c for c, _ in train_pairs}) < 3:  # a slope fitted to two contexts only mirrors their difference
        net.contrast.requires_grad_(False)
    net = net.to(device)
    on_device = values.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    size = settings.set_size

    def draw(groups: dict, picks: list, generator: np.random.Generator) -> torch.Tensor:
        """One set of ``set_size`` rows per pick (drawn again when a group has fewer cells)."""
        idx = np.stack([generator.choice(groups[k], size, replace=len(groups[k]) < size) for k in picks])
        return on_device[torch.as_tensor(idx, device=device)]

    def set_loss(predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        mean_term = ((predicted.mean(1) - real.mean(1)) ** 2).sum(-1)
        if settings.loss == "mse":
            return mean_term.mean()
        return (energy_distance(predicted, real) + settings.mean_weight * mean_term).mean()

    val_keys = [k for k in val_pairs if k[1] in {p for _, p in keys}]
    if val_keys:  # fixed control and perturbed sets per validation pair, drawn once
        val_rng = np.random.default_rng(random_state + 1)
        val_controls = draw({k: controls[k[0]] for k in val_keys}, val_keys, val_rng)
        val_real = draw(val_pairs, val_keys, val_rng)
        val_codes = torch.tensor([perturbations.index(p) for _, p in val_keys], device=device)
    fitted = Fitted(net)
    best, best_state, stale = np.inf, copy.deepcopy(net.state_dict()), 0
    if val_keys:  # training is kept only where it beats its start (the binned baseline) on validation
        net.eval()
        with torch.no_grad():
            fitted.untrained_val_loss = best = float(set_loss(net(val_controls, val_codes), val_real))
    total_steps = settings.max_epochs * steps
    with progress_bar(total=total_steps, desc=description, unit="step", progress=settings.progress) as bar:
        for epoch in range(settings.max_epochs):
            net.train()
            total = 0.0
            for _ in range(steps):
                picks = rng.integers(len(keys), size=settings.sets_per_batch)
                chosen = [keys[i] for i in picks]
                x = draw({k: controls[k[0]] for k in chosen}, chosen, rng)
                y = draw(train_pairs, chosen, rng)
                batch_loss = set_loss(net(x, codes[picks].to(device)), y)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                total += batch_loss.item()
                if settings.monitor is not None:
                    settings.monitor.add_cells(settings.sets_per_batch * size)
                bar.update(1)
            entry = {"epoch": epoch, "loss": total / steps}
            if val_keys:
                net.eval()
                with torch.no_grad():
                    entry["val_loss"] = float(set_loss(net(val_controls, val_codes), val_real))
            fitted.history.append(entry)
            bar.set_postfix(epoch=epoch + 1, loss=f"{entry['loss']:.3f}", val=f"{entry.get('val_loss', np.nan):.3f}")
            score = entry.get("val_loss", entry["loss"])
            if score < best - 1e-6:
                best, best_state, fitted.best_epoch, stale = score, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                stale += 1
                if settings.early_stopping and stale >= settings.early_stopping:
                    break
    net.load_state_dict(best_state)
    return fitted
