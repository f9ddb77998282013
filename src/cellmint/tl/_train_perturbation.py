"""``cm.tl.train_perturbation``: a set model of perturbation responses, trained with a distributional loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from .._utils._panel import adata_gene_panel as gene_panel
from .._utils._resources import ResourceMonitor
from ..models._artifact import check_writable
from ..models._normalize import InputRecipe
from ..models._perturbation import PerturbationModel
from . import _perturbation_data as data
from . import _perturbation_stack as stacking
from ._perturbation_fit import Fitted, Settings, average_effects, binned_means, fit_network

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["train_perturbation", "binned_means"]

LOSSES = ("energy", "mse")
#: genes=None keeps every gene up to this many; above, this many highly variable genes
MAX_PANEL = 2000
#: share of each pair's perturbed cells set aside to choose the best epoch
VALIDATION_FRACTION = 0.1
#: inner folds of the training contexts for the stacking weights (and the networks of the ensemble)
STACK_FOLDS = 4


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


def _folds(contexts: list[str], n_folds: int, rng: np.random.Generator) -> list[list[str]]:
    """Training contexts in ``n_folds`` groups of (nearly) equal size, drawn at random (one context each when few)."""
    order = list(rng.permutation(contexts))
    return [sorted(order[i::n_folds]) for i in range(n_folds)]


def _check_arguments(loss: str, set_size: int, effect_bins: int, stack_folds: int) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}.")
    if set_size < 2:
        raise ValueError("set_size must be at least 2.")
    if not 1 <= effect_bins <= set_size:
        raise ValueError(f"effect_bins must be between 1 and set_size ({set_size}), not {effect_bins}.")
    if stack_folds < 2:
        raise ValueError(f"stack_folds must be at least 2, not {stack_folds!r}.")


@dataclass
class _Cells:
    """The training cells: their rows of ``adata``, pairs and controls (positions in ``rows``), and their values."""

    rows: np.ndarray
    pairs: dict
    perturbations: list[str]
    controls: dict
    kind: str
    recipe: InputRecipe
    panel: pd.Index
    genes_values: np.ndarray  # log-values of the gene panel
    values: torch.Tensor  # what the networks read: genes_values, or the representation use_rep
    decoder: dict | None  # use_rep: the ridge map back to the gene panel


def _training_cells(adata, perturbation_key: str, control: str, context_key: str | None, *, layer, genes, use_rep,
                    input: str, split_key: str | None) -> _Cells:  # fmt: skip
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
    return _Cells(rows, pairs, perturbations, controls, kind, recipe, panel, genes_values, values, decoder)


@dataclass(frozen=True)
class _ToGenes:
    """As PerturbationModel.shifted_genes: the decoded change added to the cells' own panel values."""

    genes_values: np.ndarray
    decoder: dict | None

    def __call__(self, inputs: np.ndarray, cells: np.ndarray, members: np.ndarray) -> np.ndarray:
        if self.decoder is not None:
            cells = self.genes_values[members] + (cells - inputs) @ self.decoder["weight"]
        return np.clip(cells, 0, None)


def _fold_networks(cells: _Cells, folds: list[list[str]], settings: Settings, random_state: int) -> tuple[list, dict]:
    """One network per inner fold, trained on the other folds' contexts; their out-of-fold pseudobulks."""
    fitted, oof, to_genes = [], {}, _ToGenes(cells.genes_values, cells.decoder)
    for k, held in enumerate(folds):
        train_k = {key: v for key, v in cells.pairs.items() if key[0] not in held}
        val_k = {key: v for key, v in cells.pairs.items() if key[0] in held}
        if not train_k:
            continue
        one = fit_network(cells.values, cells.controls, cells.perturbations, train_k, val_k, settings,
                          random_state + k, description=f"fold {k + 1}/{len(folds)}")  # fmt: skip
        one.net.cpu()
        known = {p for _, p in train_k}
        oof |= stacking.network_bulks(one.net, cells.values, cells.controls, held, cells.pairs, known,
                                      cells.perturbations, settings.set_size, to_genes, random_state)  # fmt: skip
        one.validation = f"fold {k + 1}: contexts {held}"
        fitted.append(one)
    return fitted, oof


def _model_networks(cells: _Cells, fitted: list[Fitted], effect_bins: int) -> list:
    """The networks, each keeping every training context's average effect (its validation contexts' too)."""
    effects, control_means = average_effects(cells.values, cells.pairs, cells.controls, cells.perturbations,
                                             effect_bins)  # fmt: skip
    nets = []
    for one in fitted:
        net = one.net.cpu()
        net.binned_effect.copy_(effects)
        net.control_mean.copy_(control_means)
        nets.append(net)
    return nets


def _stacking(adata, cells: _Cells, folds: list, contexts: list, oof: dict, layer) -> dict:
    """The stacking weights learned on the folds; with one training context, the network and the perturbation mean."""
    stacked = stacking.fit_stack(adata, cells.rows, cells.pairs, cells.controls, cells.perturbations,
                                 folds or [contexts], oof, cells.panel, cells.kind, layer)  # fmt: skip
    if not folds:
        logg.warning("one training context: the stacking weights cannot be learned on unseen contexts; "
                     "the network alone predicts its panel, the perturbation mean the other genes")  # fmt: skip
        stacked["weights"][:] = np.eye(len(stacking.COMPONENTS))[0]
        stacked["baseline_weights"][:] = np.eye(len(stacking.PREDICTORS))[stacking.PREDICTORS.index(
            "perturbation_mean")]  # fmt: skip
    return stacked


def _manifest(cells: _Cells, fitted: list[Fitted], folded: list[Fitted], params: dict, architecture: dict,
              report) -> dict:  # fmt: skip
    counts = pd.Series({f"{c}|{p}": len(r) for (c, p), r in cells.pairs.items()})
    first = fitted[0]
    history = {"loss": [h["loss"] for h in first.history],
               "val_loss": [h.get("val_loss", np.nan) for h in first.history]}  # fmt: skip
    networks = [{"validation": one.validation, "epochs": len(one.history), "best_epoch": one.best_epoch,
                 "untrained_val_loss": one.untrained_val_loss} for one in fitted]  # fmt: skip
    fold_only = [one for one in folded if all(one is not other for other in fitted)]
    fold_networks = [{"validation": one.validation, "epochs": len(one.history), "best_epoch": one.best_epoch}
                     for one in fold_only]  # fmt: skip
    return {
        "params": params,
        "architecture": {"n_features": int(cells.values.shape[1]), **architecture},
        "data": {
            "n_cells": len(cells.rows),
            "n_contexts": len(cells.controls),
            "contexts": sorted(map(str, cells.controls)),
            "n_pairs": len(cells.pairs),
            "cells_per_pair": {"min": int(counts.min()), "median": float(counts.median()), "max": int(counts.max())},
        },
        "history": history,
        "best_epoch": first.best_epoch,  # -1: no epoch beat the untrained network on the validation sets
        "untrained_val_loss": first.untrained_val_loss,
        "networks": networks,
        "fold_networks": fold_networks,  # trained only for the stacking weights (two training contexts)
        "resources": {**report.to_dict(), "epochs": sum(len(one.history) for one in [*fitted, *fold_only])},
    }


@doc_params()
def train_perturbation(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    *,
    context_key: str | None,
    layer: str | None = None,
    genes: Sequence[str] | str | None = None,
    use_rep: str | None = None,
    input: str = "auto",
    split_key: str | None = None,
    stack: bool = True,
    stack_folds: int = STACK_FOLDS,
    set_size: int = 128,
    sets_per_batch: int = 8,
    loss: str = "energy",
    mean_weight: float = 1.0,
    hidden: int = 128,
    gene_dim: int = 8,
    effect_bins: int = 10,
    effect_input: bool = True,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.1,
    max_epochs: int = 100,
    early_stopping: int | None = 15,
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
    """Train a model of how cells of a context respond to a perturbation, stacked with the simple baselines.

    The network (a State-like set model, :class:`~cellmint.PerturbationModel`) reads a *set* of
    control cells of one context (a patient, a cell line, a replicate) and a perturbation; the
    cells attend to each other, so the prediction for each cell depends on its context, and the
    network predicts each cell's perturbed state as ``control + average effect + residual``. The
    average effect of each perturbation over the training contexts is fixed, per share of each
    gene's values (``effect_bins``; an untrained network is the "perturbation mean" baseline with
    the training contexts' spread of responses); the residual is learned with an energy-distance
    loss between the predicted set and a set of real perturbed cells of the same context and
    perturbation, plus ``mean_weight`` × the squared distance between their means.

    With ``stack=True`` (the default) the training contexts are split into ``stack_folds`` folds; a
    network is trained on each fold's complement and chooses its epoch on the fold, and every
    component (that network, the four baselines of :func:`~cellmint.tl.perturbation_baselines` and
    its ``pls`` predictor, a partial-least-squares regression from a context's control pseudobulk to
    every perturbation's effect at once) predicts the fold's contexts. Per perturbation, the
    weights of the components that best predict those unseen contexts (squared error of
    pseudobulks, non-negative, summing to 1) make the default prediction of
    :func:`~cellmint.tl.predict_perturbation`: the best of what it is shown beside, in expectation
    never below the best baseline. With three or more training contexts the fold networks are also
    the model's networks (their predictions are averaged); with two, one more network is trained on
    both. Genes outside the panel are predicted by the stack of the other components alone.

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
        The networks' gene panel: ``None`` (every gene when there are at most 2,000, else the 2,000
        most variable by :func:`cellmint.pp.select_hvgs`), a list of names, or a boolean ``var``
        column. With ``stack=True`` every gene of ``adata`` is still predicted.
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
    stack
        Learn the stacking weights with inner folds (see above) and keep the training pseudobulks of
        every gene; ``False``: one network, predictions of the panel only (the model of cellmint
        before stacking).
    stack_folds
        Inner folds of the training contexts (at most one per context). More folds: more networks
        to train, each on more contexts.
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
    effect_input
        The per-value network also reads the average effect it corrects, so it can scale a response
        up or down per context.
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
        the validation sets, it is kept (best epoch -1).
    validation
        The cells that choose the best epoch of a network trained outside the inner folds
        (``stack=False``, or the extra network of two training contexts): ``"context"`` sets aside
        every perturbed cell of one training context, ``"cells"`` 10% of each context/perturbation
        pair's cells; ``"auto"`` is ``"context"`` with three or more training contexts, else ``"cells"``.
        The fold networks choose their epoch on their fold's contexts.
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
    The :class:`~cellmint.PerturbationModel`, with its training history in ``manifest["history"]``
    (per network in ``manifest["networks"]``) and, with ``stack=True``, ``model.stack`` (weights,
    folds, out-of-fold errors of each component and of the stack). Writes ``adata.uns[key_added]``
    (model folder, keys, control label, perturbations, gene panel, input recipe, parameters, data
    summary, training history, stacking weights, file checksums; h5ad-writable).
    """
    _check_arguments(loss, set_size, effect_bins, stack_folds)
    torch_device = resolve_device(device)
    if model_dir is not None:
        check_writable(model_dir, overwrite=overwrite)
    start = logg.info(f"training a perturbation model on {torch_device}")
    cells = _training_cells(adata, perturbation_key, control, context_key, layer=layer, genes=genes, use_rep=use_rep,
                            input=input, split_key=split_key)  # fmt: skip
    rng = np.random.default_rng(random_state)
    architecture = {"hidden": hidden, "n_layers": n_layers, "n_heads": n_heads, "dropout": dropout,
                    "gene_dim": gene_dim, "effect_bins": effect_bins, "effect_input": effect_input}  # fmt: skip
    contexts = sorted({c for c, _ in cells.pairs})
    folds = _folds(contexts, min(stack_folds, len(contexts)), rng) if stack and len(contexts) >= 2 else []
    params = {
        "perturbation_key": perturbation_key, "control": str(control), "context_key": context_key, "layer": layer,
        "use_rep": use_rep, "input": cells.kind, "split_key": split_key, "stack": stack, "stack_folds": stack_folds,
        "set_size": set_size, "sets_per_batch": sets_per_batch, "loss": loss, "mean_weight": mean_weight,
        "max_epochs": max_epochs, "early_stopping": early_stopping, "validation": validation, "lr": lr,
        "weight_decay": weight_decay, "random_state": random_state, "device": str(torch_device),
    }  # fmt: skip
    with ResourceMonitor(device=torch_device) as monitor:
        settings = Settings(architecture, set_size, sets_per_batch, loss, mean_weight, max_epochs, early_stopping,
                            lr, weight_decay, torch_device, progress, monitor)  # fmt: skip
        folded, oof = _fold_networks(cells, folds, settings, random_state)
        fitted = folded
        if len(contexts) < 3 or not fitted:  # the fold networks never saw enough contexts: one more on all of them
            train_pairs, val_pairs, chosen = _validation(cells.pairs, validation, rng)
            one = fit_network(cells.values, cells.controls, cells.perturbations, train_pairs, val_pairs, settings,
                              random_state, description="training")  # fmt: skip
            one.validation = chosen
            fitted = [one]
        nets = _model_networks(cells, fitted, effect_bins)
        stacked = _stacking(adata, cells, folds, contexts, oof, layer) if stack else None
    report = monitor.report
    manifest = _manifest(cells, fitted, folded, params, architecture, report)
    model = PerturbationModel(nets, genes=list(cells.panel), perturbations=cells.perturbations, control=str(control),
                              perturbation_key=perturbation_key, context_key=context_key, recipe=cells.recipe,
                              use_rep=use_rep, decoder=cells.decoder, manifest=manifest, stack=stacked)  # fmt: skip
    if model_dir is not None:
        model.save(model_dir, overwrite=overwrite)
    adata.uns[key_added] = model.uns_summary()
    logg.info(f"    finished: {len(nets)} network(s), {manifest['resources']['epochs']} epochs; {report}", time=start)
    return model
