"""``cm.tl.predict_perturbation``: predicted perturbed cells of contexts, from their control cells."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from .._utils._panel import align_genes, require_overlap
from ..io._models import resolve_model
from ..models._perturbation import PerturbationModel
from . import _perturbation_data as data
from . import _perturbation_stack as stacking

PREDICTORS = ("stack", "network", "baselines")
#: var["prediction_source"] of each kind of gene
SOURCES = {"stack": "network+baselines", "baselines": "baselines", "unknown": "control (gene not in training data)"}


@doc_params()
def predict_perturbation(
    adata: ad.AnnData,
    model: PerturbationModel | str | Path | None,
    perturbations: str | Sequence[str],
    *,
    context_key: str | None = None,
    contexts: Sequence[str] | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    include_control: bool = True,
    predictor: str = "stack",
    device: str = "auto",
    random_state: int = 0,
    key_added: str = Key.uns.prediction,
) -> ad.AnnData:
    """Predict how the cells of each context respond to perturbations, from that context's control cells.

    Every control cell of a context gets a predicted perturbed state for each perturbation. By default
    (``predictor="stack"``) it is the weighted average, cell by cell, of the network's prediction
    (computed in sets of the model's ``set_size`` cells of the same context), of the four simple
    baselines' and of the ``pls`` predictor's (each ``max(control cell + delta, 0)``; see
    :func:`~cellmint.tl.perturbation_baselines`), with the weights the model learned on training
    contexts it had not seen (see :func:`~cellmint.tl.train_perturbation`); genes outside the
    network's panel are the weighted average of those other predictors alone, so every gene of
    ``adata`` is predicted. Genes are matched to the model's by name (Ensembl versions ignored);
    values are normalised as in training.

    Parameters
    ----------
    adata
        AnnData holding the control cells of the contexts to predict (other cells are ignored).
    model
        A :class:`~cellmint.PerturbationModel`, a model folder, or ``None`` to use the folder named in
        ``adata.uns[key_added]``.
    perturbations
        Perturbation label(s) to predict. A label the model was not trained on is an error — never
        a silent fallback to the control.
    context_key
        ``obs`` column of the context; default: the model's. Data without that column are one context.
    contexts
        Contexts to predict (default: every context with control cells in ``adata``). A context
        without control cells is an error.
    {doc_layer}
    n_cells
        Predicted cells per context and perturbation: control cells drawn without replacement (with
        replacement when more are asked for than exist). ``None``: one per control cell.
    include_control
        Also return the control cells themselves (``is_predicted`` False), in the same space, so that
        the result holds its own control for deltas (what :func:`cellmint.tl.evaluate_perturbation`
        and cell-eval expect).
    predictor
        ``"stack"`` (default): the network stacked with the baselines, every gene of ``adata``;
        ``"network"``: the network alone, over its panel (for ablations, and what models trained
        with ``stack=False`` or by cellmint before stacking give); ``"baselines"``: the stack
        without the network (the baselines and ``pls``), every gene.
    {doc_device}
    {doc_random_state}
    key_added
        Key of ``uns`` for the prediction's metadata (and where ``model=None`` looks for the model).

    Returns
    -------
    AnnData of predicted cells × genes (every gene of ``adata`` for ``"stack"`` and ``"baselines"``,
    in its order; the model's panel for ``"network"``): ``X`` log-normalised expression (float32,
    dense); ``obs`` columns ``perturbation_key`` and the context column (categorical),
    ``is_predicted`` and ``source_cell`` (the control cell each prediction was made from);
    ``var["prediction_source"]``: ``"network+baselines"``, ``"baselines"`` or, for a gene the
    training data did not have, ``"control (gene not in training data)"`` (no effect predicted);
    ``uns[key_added]`` with the model folder, predictor, perturbations, contexts, cell counts and
    the stacking weights used (``"weights"``, ``"baseline_weights"``: DataFrames perturbations ×
    components).
    """
    model = resolve_model(adata, model, key_added, PerturbationModel)
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, not {predictor!r}.")
    if predictor != "network" and model.stack is None:
        logg.warning("this model has no stack (trained with stack=False or by cellmint before stacking): "
                     "predicting its panel with the network alone")  # fmt: skip
        predictor = "network"
    perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    if not perturbations:
        raise ValueError("perturbations is empty: name at least one perturbation to predict.")
    model.perturbation_codes(perturbations)  # unknown labels: error before any work
    context_key = context_key if context_key is not None else model.context_key
    if context_key is not None and context_key not in adata.obs:
        logg.warning(f"adata.obs has no {context_key!r} column: all its cells are treated as one context")
        context_key = None
    context = data.contexts(adata, context_key)
    is_control = data.labels(adata, model.perturbation_key, what="Perturbation").to_numpy() == model.control
    available = pd.Index(sorted(context[is_control].unique()))
    if contexts is None:
        wanted = available
        if not len(wanted):
            raise ValueError(f"adata has no control cells ({model.perturbation_key} == {model.control!r}): "
                             "predictions are made from a context's control cells.")  # fmt: skip
    else:
        wanted = pd.Index([str(c) for c in contexts])
        lacking = wanted.difference(available)
        if len(lacking):
            raise ValueError(f"Context(s) {list(lacking[:5])} have no control cells in adata "
                             f"({model.perturbation_key} == {model.control!r}); cannot predict them.")  # fmt: skip
    torch_device = resolve_device(device)
    query_genes = pd.Index(adata.var_names.astype(str))
    columns = None
    if model.use_rep is None and predictor != "baselines":  # the network reads its whole panel
        columns, overlap = align_genes(query_genes, model.genes, strip_versions=True, where="adata")
        n_missing = overlap["n_model_genes"] - overlap["n_found"]
        require_overlap(overlap, where="adata", minimum=1.0, why=f"; {n_missing} missing from adata, e.g. "
                        f"{list(overlap['missing'][:5])}: the network needs its whole panel.")  # fmt: skip
    if model.use_rep is None or predictor != "network":
        # the values must be of the kind the model was trained on, either way round
        found = data.input_kind(adata, layer, "auto")
        if found != model.recipe.kind:
            trained = "raw counts" if model.recipe.kind == "counts" else "log-normalised values"
            held = "raw counts" if found == "counts" else "log-normalised values"
            raise ValueError(f"The model was trained on {trained}, but adata holds {held}: pass the "
                             f"{trained} with layer=.")  # fmt: skip
    plan = _plan(model, query_genes, predictor)
    expression = None
    if predictor != "network":
        expression = data.LogExpression(adata, query_genes, layer=layer, what="adata", kind=model.recipe.kind)
    rng = np.random.default_rng(random_state)
    blocks, obs = [], []
    for c in wanted:
        rows = np.flatnonzero(is_control & (context.to_numpy() == c))
        if n_cells is not None:
            rows = np.sort(rng.choice(rows, n_cells, replace=n_cells > len(rows)))
        names = np.asarray(adata.obs_names[rows])
        predicted = _context_predictions(model, adata, rows, c, perturbations, plan, predictor, columns,
                                         expression, layer, random_state, torch_device)  # fmt: skip
        if include_control:
            blocks.append(predicted.pop("control"))
            obs.append(pd.DataFrame({model.perturbation_key: model.control, "context": c, Key.obs.is_predicted: False,
                                     Key.obs.source_cell: names}))  # fmt: skip
        for p in perturbations:
            blocks.append(predicted[p])
            obs.append(pd.DataFrame({model.perturbation_key: p, "context": c, Key.obs.is_predicted: True,
                                     Key.obs.source_cell: names}))  # fmt: skip
    frame = pd.concat(obs, ignore_index=True)
    frame = frame.rename(columns={"context": context_key or "context"})
    for key in (model.perturbation_key, context_key or "context"):
        frame[key] = frame[key].astype("category")
    frame.index = [f"{s}-{p}" for s, p in zip(frame[Key.obs.source_cell], frame[model.perturbation_key], strict=True)]
    frame.index = pd.Index(frame.index).astype(str)
    var = pd.DataFrame({Key.var.prediction_source: pd.Categorical(plan["source"])}, index=plan["genes"].astype(str))
    result = ad.AnnData(np.concatenate(blocks), obs=frame, var=var)
    if not result.obs_names.is_unique:  # n_cells drawn with replacement repeats source cells
        result.obs_names_make_unique()
    result.uns[key_added] = {
        "model_dir": str(model.path) if model.path is not None else "",
        "predictor": predictor,
        Key.uns.perturbations: np.asarray(perturbations, dtype=object),
        "contexts": np.asarray(list(wanted), dtype=object),
        "n_cells": int((frame[Key.obs.is_predicted]).sum()),
        "space": "log1p(1e4 · x / library size)" if model.recipe.kind == "counts" else "as given (log-normalised)",
    }
    if predictor != "network":
        for name, table in (("weights", model.stack_weights()),
                            ("baseline_weights", model.stack_weights(baselines_only=True))):  # fmt: skip
            result.uns[key_added][name] = table.loc[perturbations]
    logg.info(f"predicted {len(perturbations)} perturbation(s) in {len(wanted)} context(s) with the {predictor}: "
              f"{result.uns[key_added]['n_cells']:,} cells × {result.n_vars:,} genes")  # fmt: skip
    return result


def _plan(model: PerturbationModel, query_genes: pd.Index, predictor: str) -> dict:
    """Which genes come out and where each comes from: the panel (network), the stack's genes, or neither."""
    if predictor == "network":
        return {"genes": model.genes, "source": np.full(len(model.genes), "network", dtype=object)}
    stack_genes = pd.Index(model.stack["genes"])
    in_stack, _ = align_genes(stack_genes, query_genes, strip_versions=True)  # per query gene, its stack position
    in_panel, _ = align_genes(model.genes, query_genes, strip_versions=True)
    use_network = predictor == "stack"
    source = np.where(in_stack < 0, SOURCES["unknown"],
                      np.where((in_panel >= 0) & use_network, SOURCES["stack"], SOURCES["baselines"]))  # fmt: skip
    return {"genes": query_genes, "source": source.astype(object), "in_stack": in_stack, "in_panel": in_panel,
            "network": use_network}  # fmt: skip


def _context_predictions(model, adata, rows, context, perturbations, plan, predictor, columns, expression, layer,
                         random_state, device) -> dict[str, np.ndarray]:  # fmt: skip
    """``{"control": control cells, perturbation: predicted cells}`` of one context, over the plan's genes."""
    network_values = None
    if plan.get("network", predictor == "network"):
        if model.use_rep is None:
            network_values = data.panel_values(adata, columns, model.recipe, layer, rows)
        else:
            network_values = data.rep_values(adata, model.use_rep, rows, model.net.binned_effect.shape[-1])
    if predictor == "network":
        out = {"control": model.to_genes(network_values)}
        for p in perturbations:
            out[p] = model.to_genes(model.respond(network_values, p, random_state=random_state, device=device))
        return out
    cells = expression.rows(rows)
    out = {"control": cells.astype(np.float32)}
    known = plan["in_stack"] >= 0
    panel_genes = plan["in_panel"] >= 0 if plan["network"] else np.zeros(len(known), bool)
    others = known & ~panel_genes
    effects = stacking.effects_of(model.stack, genes=plan["in_stack"][known])
    pairs = [(str(context), p) for p in perturbations]
    full, base = model.stack_weights(), model.stack_weights(baselines_only=True)
    components = list(base.columns)  # those the model was trained with (models before ``pls``: the baselines)
    deltas = stacking.baseline_deltas(effects, pairs, {str(context): cells[:, known].mean(axis=0)}, components)
    for i, p in enumerate(perturbations):
        predicted = cells.copy()  # genes the training data did not have: no effect
        shifted = {b: np.maximum(cells[:, known] + deltas[b][i], 0.0) for b in components}
        in_known_others = others[known]
        predicted[:, others] = sum(base.loc[p, b] * shifted[b][:, in_known_others] for b in components)
        if panel_genes.any():
            order = plan["in_panel"][panel_genes]
            measured = np.zeros((len(cells), len(model.genes)))
            measured[:, order] = cells[:, panel_genes]
            predicted_values = model.respond(network_values, p, random_state=random_state, device=device)
            network = model.shifted_genes(network_values, predicted_values, measured)
            in_known_panel = panel_genes[known]
            combined = full.loc[p, "network"] * network[:, order]
            combined += sum(full.loc[p, b] * shifted[b][:, in_known_panel] for b in components)
            predicted[:, panel_genes] = combined
        out[p] = predicted.astype(np.float32)
    return out
