"""``cm.tl.train_perturbation``: a set model of perturbation responses, trained with a distributional loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from .._utils._progress import progress_bar
from .._utils._resources import ResourceMonitor
from ..models._artifact import check_writable
from ..models._normalize import InputRecipe
from ..models._perturbation import PerturbationModel, PerturbationNet, energy_distance
from . import _perturbation_data as data
from ._train_data import gene_panel

LOSSES = ("energy", "mse")
#: genes=None keeps every gene up to this many; above, this many highly variable genes
MAX_PANEL = 2000
#: share of each pair's perturbed cells set aside to choose the best epoch
VALIDATION_FRACTION = 0.1


def _panel(adata, genes: Any, kind: str, layer: str | None) -> pd.Index:
    """The annotator's gene panel rules, except that ``None`` above MAX_PANEL genes means the most variable."""
    if genes is None and adata.n_vars > MAX_PANEL:
        from ..pp import select_hvgs

        flavor = "seurat_v3" if kind == "counts" else "seurat"
        table = select_hvgs(adata, n_top_genes=MAX_PANEL, flavor=flavor, layer=layer, inplace=False)
        genes = adata.var_names.astype(str)[np.asarray(table["highly_variable"], dtype=bool)]
    return gene_panel(adata, genes)


def _pairs(perturbation: pd.Series, context: pd.Series, control: str) -> tuple[dict, list[str], dict]:
    """Training pairs ``{(context, perturbation): rows}``, controls ``{context: rows}`` and the perturbations.

    Contexts without control cells, and pairs with fewer than MIN_CELLS cells, cannot be trained on:
    they are left out with a warning naming them.
    """
    if not (perturbation == control).any():
        raise ValueError(f"No cell has the control label {control!r} in the perturbation column "
                         f"(labels: {sorted(perturbation.unique())[:10]}).")  # fmt: skip
    groups = pd.Series(np.arange(len(perturbation))).groupby([context.to_numpy(), perturbation.to_numpy()]).indices
    controls = {c: rows for (c, p), rows in groups.items() if p == control}
    pairs, skipped, orphaned = {}, [], []
    for (c, p), rows in groups.items():
        if p == control:
            continue
        if c not in controls:
            orphaned.append(c)
        elif len(rows) < data.MIN_CELLS:
            skipped.append(f"{p} in {c} ({len(rows)} cells)")
        else:
            pairs[(c, p)] = np.asarray(rows)
    if orphaned:
        logg.warning(f"contexts without control cells are not trained on: {sorted(set(orphaned))[:5]}")
    if skipped:
        logg.warning(f"{len(skipped)} perturbation/context pairs have fewer than {data.MIN_CELLS} cells and are "
                     f"not trained on, e.g. {skipped[:3]}")  # fmt: skip
    if not pairs:
        raise ValueError("No context has both control cells and at least "
                         f"{data.MIN_CELLS} cells of a perturbation: nothing to train on.")  # fmt: skip
    return pairs, sorted({p for _, p in pairs}), controls


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


def _average_effects(values: torch.Tensor, pairs: dict, controls: dict, perturbations: list[str],
                     bins: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per perturbation, over its training contexts: the binned mean effect and the mean control mean.

    The effect of bin ``b`` is the mean of the ``b``-th share of the sorted perturbed values minus
    that of the sorted control values (per gene, within a context); averaged over the bins it is
    the mean effect (perturbed mean − control mean), the "perturbation mean" baseline.
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
    return effects / counts.view(-1, 1, 1), control_means / counts.unsqueeze(1)


def _validation(pairs: dict, validation: str, rng: np.random.Generator) -> tuple[dict, dict, str]:
    """Training and validation cells of each pair, and how they were chosen.

    ``"context"``: every perturbed cell of one training context (drawn at random among those whose
    perturbations are all measured in another context too) is set aside, so the best epoch is the
    one that predicts an unseen context best. ``"cells"``: 10% of each pair's cells.
    """
    if validation not in ("auto", "context", "cells"):
        raise ValueError(f"validation must be 'auto', 'context' or 'cells', not {validation!r}.")
    by_context: dict = {}
    for c, p in pairs:
        by_context.setdefault(c, set()).add(p)
    if validation in ("auto", "context"):
        candidates = [c for c, ps in by_context.items()
                      if all(any(p in other for d, other in by_context.items() if d != c) for p in ps)]  # fmt: skip
        if len(by_context) >= 3 and candidates:
            held = candidates[rng.integers(len(candidates))]
            train = {k: v for k, v in pairs.items() if k[0] != held}
            return train, {k: v for k, v in pairs.items() if k[0] == held}, f"context {held!r}"
        if validation == "context":
            raise ValueError("validation='context' needs at least 3 training contexts, one of whose perturbations "
                             "are all measured in another context too.")  # fmt: skip
    train, val = {}, {}
    for key, members in pairs.items():
        members = rng.permutation(members)
        n_val = round(VALIDATION_FRACTION * len(members)) if len(members) >= 2 * data.MIN_CELLS else 0
        train[key] = members[n_val:]
        if n_val:
            val[key] = members[:n_val]
    return train, val, f"{VALIDATION_FRACTION:.0%} of each pair's cells"


def _fit_decoder(rep: np.ndarray, genes: np.ndarray, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Ridge map from the representation back to log-normalised genes (``rep @ weight + bias``)."""
    from sklearn.linear_model import Ridge

    fit = Ridge(alpha=alpha).fit(rep, genes)
    return {"weight": fit.coef_.T.astype(np.float32), "bias": fit.intercept_.astype(np.float32)}


@doc_params()
def train_perturbation(
    adata: Any,
    perturbation_key: str,
    control: str,
    *,
    context_key: str | None,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    use_rep: str | None = None,
    input: str = "auto",
    split_key: str | None = None,
    set_size: int = 128,
    sets_per_batch: int = 8,
    loss: str = "energy",
    mean_weight: float = 1.0,
    hidden: int = 128,
    gene_dim: int = 8,
    effect_bins: int = 10,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.1,
    max_epochs: int = 200,
    early_stopping: int | None = 30,
    validation: str = "auto",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    random_state: int = 0,
    key_added: str = "cellmint_perturbation",
    progress: bool | None = None,
) -> PerturbationModel:
    """Train a model of how cells of a context respond to a perturbation, from control and perturbed cells.

    The model (a State-like set model, :class:`~cellmint.PerturbationModel`) reads a *set* of
    control cells of one context (a patient, a cell line, a replicate) and a perturbation; the
    cells attend to each other, so the prediction for each cell depends on its context, and the
    network predicts each cell's perturbed state as ``control + average effect + residual``. The
    average effect of each perturbation over the training contexts is fixed, per share of each
    gene's values (``effect_bins``; an untrained model is the "perturbation mean" baseline with the
    training contexts' spread of responses); the residual is learned with an energy-distance loss between
    the predicted set and a set of real perturbed cells of the same context and perturbation, plus
    ``mean_weight`` × the squared distance between their means.

    Parameters
    ----------
    adata
        In-memory AnnData with control and perturbed cells of several contexts.
    perturbation_key
        ``obs`` column naming each cell's perturbation (drug, knocked-out gene).
    control
        The label of control cells in ``perturbation_key`` (e.g. ``"DMSO"``, ``"non-targeting"``).
    context_key
        ``obs`` column of the context (patient, cell line, replicate); each predicted set is built
        from one context's control cells. ``None``: all cells are one context.
    {doc_layer}
    genes
        The gene panel: ``None`` (every gene when there are at most 2,000, else the 2,000 most
        variable by :func:`cellmint.pp.select_hvgs`), a list of names, or a boolean ``var`` column.
    use_rep
        Work in ``adata.obsm[use_rep]`` (e.g. ``"X_pca"``) instead of the gene panel; a ridge map
        fitted on the training cells decodes predictions back to genes. Queries need the same
        representation.
    input
        ``"counts"``, ``"lognorm"`` (log1p-normalised values, what many public perturbation sets
        ship) or ``"auto"`` (detected). Counts become ``log1p(1e4 · x / library size)``, the library
        size over all of the cell's genes; predictions are always log-normalised.
    split_key
        ``obs`` column (e.g. from :func:`cellmint.tl.perturbation_split`): only cells marked
        ``"train"`` are used. ``None``: all cells.
    set_size
        Cells per set (State uses 128–512).
    sets_per_batch
        Sets per optimisation step.
    loss
        ``"energy"`` (energy distance + mean term) or ``"mse"`` (mean term only).
    mean_weight
        Weight of the squared distance between the predicted and real set means.
    hidden
        Width of the cell tokens the set's cells attend with.
    gene_dim
        Size of the gene, perturbation and context embeddings that the per-value network reads.
    effect_bins
        Shares of a gene's sorted values whose average effects the model starts from (see
        :class:`~cellmint.models._perturbation.PerturbationNet`): a control cell in the lowest
        tenth of a gene's values within its set moves like the lowest tenth of the training
        contexts' cells did. ``1``: every cell moves by the mean effect (the "perturbation mean"
        baseline). At most ``set_size``.
    n_layers
        Attention layers.
    n_heads
        Attention heads.
    dropout
        Dropout in the attention layers and on the context vector.
    max_epochs
        Epochs; one epoch draws about as many sets as it takes to see every training perturbed cell once.
    early_stopping
        Stop after this many epochs without a lower validation loss and keep the best weights;
        ``None`` trains all epochs. The untrained network competes too: when no epoch beats it on
        the validation sets, it is kept (``manifest["best_epoch"]`` is -1).
    validation
        The cells that choose the best epoch: ``"context"`` sets aside every perturbed cell of one
        training context (the model is then chosen for predicting a context it has not seen, the
        question it is asked), ``"cells"`` 10% of each context/perturbation pair's cells; ``"auto"``
        (default) is ``"context"`` with three or more training contexts, else ``"cells"``.
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    model_dir
        Folder to save the model to (``manifest.json`` + ``weights.pt``); ``None`` keeps it in memory.
    overwrite
        Replace an existing model folder at ``model_dir`` (checked before training; replaced as a whole).
    {doc_device}
    {doc_random_state}
    key_added
        Key of ``adata.uns`` for the model's metadata.
    {doc_progress}

    Returns
    -------
    The :class:`~cellmint.PerturbationModel`, with its training history in ``manifest["history"]``.
    Writes ``adata.uns[key_added]`` (model folder, keys, control label, perturbations, gene panel,
    input recipe, parameters, data summary, training history, file checksums; h5ad-writable).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}.")
    if set_size < 2:
        raise ValueError("set_size must be at least 2.")
    if not 1 <= effect_bins <= set_size:
        raise ValueError(f"effect_bins must be between 1 and set_size ({set_size}), not {effect_bins}.")
    torch_device = resolve_device(device)
    if model_dir is not None:
        check_writable(model_dir, overwrite=overwrite)
    start = logg.info(f"training a perturbation model on {torch_device}")
    rows = np.arange(adata.n_obs)
    if split_key is not None:
        split = data.labels(adata, split_key, what="Split")
        rows = np.flatnonzero(split.to_numpy() == "train")
        if len(rows) == 0:
            raise ValueError(f"No cell is marked 'train' in adata.obs[{split_key!r}].")
    perturbation = data.labels(adata, perturbation_key, what="Perturbation").iloc[rows]
    context = data.contexts(adata, context_key).iloc[rows]
    pairs, perturbations, controls = _pairs(perturbation, context, str(control))
    kind = data.input_kind(adata, layer, input)
    recipe = InputRecipe(kind=kind)
    panel = _panel(adata, genes, kind, layer)
    columns = pd.Index(adata.var_names.astype(str)).get_indexer(panel)
    genes_values = data.panel_values(adata, columns, recipe, layer, rows)
    decoder = None
    if use_rep is not None:
        values = data.rep_values(adata, use_rep, rows)
        decoder = _fit_decoder(values, genes_values)
    else:
        values = genes_values
    values = torch.as_tensor(values)
    rng = np.random.default_rng(random_state)
    train_pairs, val_pairs, validation = _validation(pairs, validation, rng)
    # the average effects the network trains around leave the validation context out, so that
    # validation asks what the final model is asked: a context whose response was never seen
    effects, control_means = _average_effects(values, train_pairs, controls, perturbations, effect_bins)
    keys = list(train_pairs)
    codes = torch.tensor([perturbations.index(p) for _, p in keys])
    n_perturbed = sum(len(v) for v in train_pairs.values())
    steps = max(1, -(-n_perturbed // (set_size * sets_per_batch)))

    params = {
        "perturbation_key": perturbation_key, "control": str(control), "context_key": context_key, "layer": layer,
        "use_rep": use_rep, "input": kind, "split_key": split_key, "set_size": set_size,
        "sets_per_batch": sets_per_batch, "loss": loss, "mean_weight": mean_weight, "max_epochs": max_epochs,
        "early_stopping": early_stopping, "validation": validation, "lr": lr, "weight_decay": weight_decay,
        "random_state": random_state, "device": str(torch_device),
    }  # fmt: skip
    with torch.random.fork_rng(devices=[]), ResourceMonitor(device=torch_device) as monitor:
        torch.manual_seed(random_state)
        net = PerturbationNet(values.shape[1], len(perturbations), hidden=hidden, n_layers=n_layers,
                              n_heads=n_heads, dropout=dropout, gene_dim=gene_dim, effect_bins=effect_bins)  # fmt: skip
        net.binned_effect.copy_(effects)
        net.control_mean.copy_(control_means)
        if len({c for c, _ in train_pairs}) < 3:  # a slope fitted to two contexts only mirrors their difference
            net.contrast.requires_grad_(False)
        net = net.to(torch_device)
        on_device = values.to(torch_device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

        def draw(groups: dict, picks: list, generator: np.random.Generator) -> torch.Tensor:
            """One set of ``set_size`` rows per pick (drawn again when a group has fewer cells)."""
            idx = np.stack([generator.choice(groups[k], set_size, replace=len(groups[k]) < set_size) for k in picks])
            return on_device[torch.as_tensor(idx, device=torch_device)]

        def set_loss(predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
            mean_term = ((predicted.mean(1) - real.mean(1)) ** 2).sum(-1)
            if loss == "mse":
                return mean_term.mean()
            return (energy_distance(predicted, real) + mean_weight * mean_term).mean()

        # validation: fixed control and perturbed sets per validation pair, drawn once
        val_rng = np.random.default_rng(random_state + 1)
        val_keys = list(val_pairs)
        if val_keys:
            val_controls = draw({k: controls[k[0]] for k in val_keys}, val_keys, val_rng)
            val_real = draw(val_pairs, val_keys, val_rng)
            val_codes = torch.tensor([perturbations.index(p) for _, p in val_keys], device=torch_device)

        best, best_state, best_epoch, stale, history = np.inf, copy.deepcopy(net.state_dict()), -1, 0, []
        untrained = np.nan
        if val_keys:  # training is kept only where it beats its start (the binned baseline) on validation
            net.eval()
            with torch.no_grad():
                untrained = best = float(set_loss(net(val_controls, val_codes), val_real))
        with progress_bar(total=max_epochs * steps, desc="training", unit="step", progress=progress) as bar:
            for epoch in range(max_epochs):
                net.train()
                total = 0.0
                for _ in range(steps):
                    picks = rng.integers(len(keys), size=sets_per_batch)
                    chosen = [keys[i] for i in picks]
                    x = draw({k: controls[k[0]] for k in chosen}, chosen, rng)
                    y = draw(train_pairs, chosen, rng)
                    batch_loss = set_loss(net(x, codes[picks].to(torch_device)), y)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    total += batch_loss.item()
                    monitor.add_cells(sets_per_batch * set_size)
                    bar.update(1)
                entry = {"epoch": epoch, "loss": total / steps}
                if val_keys:
                    net.eval()
                    with torch.no_grad():
                        entry["val_loss"] = float(set_loss(net(val_controls, val_codes), val_real))
                history.append(entry)
                val = entry.get("val_loss", np.nan)
                bar.set_postfix(epoch=epoch + 1, loss=f"{entry['loss']:.3f}", val=f"{val:.3f}")
                score = entry.get("val_loss", entry["loss"])
                if score < best - 1e-6:
                    best, best_state, best_epoch, stale = score, copy.deepcopy(net.state_dict()), epoch, 0
                else:
                    stale += 1
                    if early_stopping and stale >= early_stopping:
                        break
        net.load_state_dict(best_state)
        # the model keeps every training context's effect (the validation context's too)
        effects, control_means = _average_effects(values, pairs, controls, perturbations, effect_bins)
        net.binned_effect.copy_(effects.to(torch_device))
        net.control_mean.copy_(control_means.to(torch_device))
    report = monitor.report
    counts = pd.Series({f"{c}|{p}": len(r) for (c, p), r in pairs.items()})
    manifest = {
        "params": params,
        "architecture": {
            "n_features": int(values.shape[1]),
            "hidden": hidden,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "dropout": dropout,
            "gene_dim": gene_dim,
            "effect_bins": effect_bins,
        },
        "data": {
            "n_cells": len(rows),
            "n_contexts": len(controls),
            "contexts": sorted(map(str, controls)),
            "n_pairs": len(pairs),
            "cells_per_pair": {"min": int(counts.min()), "median": float(counts.median()), "max": int(counts.max())},
            "n_validation_cells": int(sum(len(v) for v in val_pairs.values())),
        },
        "history": {"loss": [h["loss"] for h in history], "val_loss": [h.get("val_loss", np.nan) for h in history]},
        "best_epoch": best_epoch,  # -1: no epoch beat the untrained network on the validation sets
        "untrained_val_loss": untrained,
        "resources": {**report.to_dict(), "epochs": len(history)},
    }
    model = PerturbationModel(net.cpu(), genes=list(panel), perturbations=perturbations, control=str(control),
                              perturbation_key=perturbation_key, context_key=context_key, recipe=recipe,
                              use_rep=use_rep, decoder=decoder, manifest=manifest)  # fmt: skip
    if model_dir is not None:
        model.save(model_dir, overwrite=overwrite)
    adata.uns[key_added] = model.uns_summary()
    logg.info(f"    finished after {len(history)} epochs (best {manifest['best_epoch']}); {report}", time=start)
    return model
