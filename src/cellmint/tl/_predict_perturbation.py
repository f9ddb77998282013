"""``cm.tl.predict_perturbation``: predicted perturbed cells of contexts, from their control cells."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._utils import _logging as logg
from .._utils._device import resolve_device
from .._utils._docs import doc_params
from ..io._models import resolve_model
from ..models._perturbation import PerturbationModel
from . import _perturbation_data as data
from ._annotate import align_genes


@doc_params()
def predict_perturbation(
    adata: Any,
    model: PerturbationModel | str | Path | None,
    perturbations: str | Sequence[str],
    *,
    context_key: str | None = None,
    contexts: Sequence[str] | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    include_control: bool = True,
    device: str = "auto",
    random_state: int = 0,
    key_added: str = "cellmint_perturbation",
) -> ad.AnnData:
    """Predict how the cells of each context respond to perturbations, from that context's control cells.

    Every control cell of a context gets a predicted perturbed state for each perturbation, computed
    in sets of the model's ``set_size`` cells of the same context. Genes are matched to the model's
    panel by name (Ensembl versions ignored); values are normalised as in training.

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
    {doc_device}
    {doc_random_state}
    key_added
        Key of ``uns`` for the prediction's metadata (and where ``model=None`` looks for the model).

    Returns
    -------
    AnnData of predicted cells × the model's genes: ``X`` log-normalised expression (float32, dense);
    ``obs`` columns ``perturbation_key`` and the context column (categorical), ``is_predicted`` and
    ``source_cell`` (the control cell each prediction was made from); ``uns[key_added]`` with the model
    folder, perturbations, contexts and cell counts.
    """
    model = resolve_model(adata, model, key_added, PerturbationModel)
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
    columns = None
    if model.use_rep is None:
        columns, overlap = align_genes(pd.Index(adata.var_names.astype(str)), model.genes, strip_versions=True)
        if overlap["n_found"] < overlap["n_model_genes"]:
            n_missing = overlap["n_model_genes"] - overlap["n_found"]
            raise ValueError(f"{n_missing} of the model's {overlap['n_model_genes']} genes are missing from "
                             f"adata, e.g. {list(overlap['missing'][:5])}: it needs its whole panel.")  # fmt: skip
        # the values must be of the kind the model was trained on, either way round
        found = data.input_kind(adata, layer, "auto")
        if found != model.recipe.kind:
            trained = "raw counts" if model.recipe.kind == "counts" else "log-normalised values"
            held = "raw counts" if found == "counts" else "log-normalised values"
            raise ValueError(f"The model was trained on {trained}, but adata holds {held}: pass the "
                             f"{trained} with layer=.")  # fmt: skip
    rng = np.random.default_rng(random_state)
    blocks, obs = [], []
    for c in wanted:
        rows = np.flatnonzero(is_control & (context.to_numpy() == c))
        if n_cells is not None:
            rows = np.sort(rng.choice(rows, n_cells, replace=n_cells > len(rows)))
        if model.use_rep is None:
            values = data.panel_values(adata, columns, model.recipe, layer, rows)
        else:
            values = data.rep_values(adata, model.use_rep, rows, model.net.binned_effect.shape[-1])
        names = np.asarray(adata.obs_names[rows])
        if include_control:
            blocks.append(model.to_genes(values))
            obs.append(pd.DataFrame({model.perturbation_key: model.control, "context": c, "is_predicted": False,
                                     "source_cell": names}))  # fmt: skip
        for p in perturbations:
            predicted = model.respond(values, p, random_state=random_state, device=torch_device)
            blocks.append(model.to_genes(predicted))
            obs.append(pd.DataFrame({model.perturbation_key: p, "context": c, "is_predicted": True,
                                     "source_cell": names}))  # fmt: skip
    frame = pd.concat(obs, ignore_index=True)
    frame = frame.rename(columns={"context": context_key or "context"})
    for key in (model.perturbation_key, context_key or "context"):
        frame[key] = frame[key].astype("category")
    frame.index = [f"{s}-{p}" for s, p in zip(frame["source_cell"], frame[model.perturbation_key], strict=True)]
    frame.index = pd.Index(frame.index).astype(str)
    result = ad.AnnData(np.concatenate(blocks), obs=frame, var=pd.DataFrame(index=model.genes.astype(str)))
    if not result.obs_names.is_unique:  # n_cells drawn with replacement repeats source cells
        result.obs_names_make_unique()
    result.uns[key_added] = {
        "model_dir": str(model.path) if model.path is not None else "",
        "perturbations": np.asarray(perturbations, dtype=object),
        "contexts": np.asarray(list(wanted), dtype=object),
        "n_cells": int((frame["is_predicted"]).sum()),
        "space": "log1p(1e4 · x / library size)" if model.recipe.kind == "counts" else "as given (log-normalised)",
    }
    logg.info(f"predicted {len(perturbations)} perturbation(s) in {len(wanted)} context(s): "
              f"{result.uns[key_added]['n_cells']:,} cells")  # fmt: skip
    return result
