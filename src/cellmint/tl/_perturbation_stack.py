"""The default perturbation predictor: the network stacked with the simple baselines it is shown beside.

Each prediction is a weighted average, cell by cell, of six predictions of the same control cell:
the network's, the four baselines' of :func:`~cellmint.tl.perturbation_baselines` (``control``,
``perturbation_mean``, ``context_mean``, ``linear``) and that of its ``pls`` predictor (a
partial-least-squares regression from a context's control pseudobulk to every perturbation's
effect at once); each but the network's is ``max(control cell + delta, 0)``. The
weights are learned where the truth is known but the answer was not seen: the training contexts
are split into folds (one context per fold when there are at most ``stack_folds``), and for each
fold every component is fitted on the other folds and predicts the fold's contexts from their
control cells. Per perturbation, the weights minimise the squared error of those out-of-fold
pseudobulks (mean log1p expression of the predicted cells) against the real ones, over genes and
contexts, on the simplex (non-negative, summing to 1), shrunk towards the weights shared by all
perturbations (a prior worth :data:`PRIOR_CONTEXTS` contexts) so that a perturbation seen in few
contexts borrows from the others.

The simplex contains each component alone, so on the training contexts the stack is never worse
than the best of them in this squared error; on a new context it is in expectation, as far as the
training contexts are like it. Genes outside the network's panel get the same kind of average over
the baselines alone (weights fitted on those genes); every gene of the training data is predicted.
The pseudobulks the baselines need (per training context: control; per pair: perturbed) are kept in
the model folder.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..models._perturbation import respond
from ._perturbation_baselines import PREDICTORS, _deltas
from ._perturbation_data import LogExpression

#: the stacked predictions: the network's, then the simple baselines' and ``pls``'s (``PREDICTORS``)
COMPONENTS = ("network", *PREDICTORS)
#: pseudo-contexts of evidence that the weights shared by all perturbations count for, in each perturbation's fit
PRIOR_CONTEXTS = 2.0
#: ridge penalty of the linear baseline (perturbation_baselines' default)
ALPHA = 1.0


def training_bulks(expression, groups: dict, control: str) -> dict:
    """Pseudobulks of the training data over every gene: per context its control cells, per pair its perturbed cells.

    ``expression``: a :class:`~cellmint.tl._perturbation_data.LogExpression` over the genes;
    ``groups``: ``{(context, perturbation): rows}``. Pairs of contexts without control cells are left out.
    """
    contexts = sorted(c for c, p in groups if p == control)
    pairs = sorted((c, p) for c, p in groups if p != control and c in contexts)
    return {
        "contexts": contexts,
        "control_bulk": np.stack([expression.mean(groups[(c, control)]) for c in contexts]),
        "pairs": [list(pair) for pair in pairs],
        "perturbed_bulk": np.stack([expression.mean(groups[pair]) for pair in pairs]),
    }


def effects_of(bulks: dict, contexts=None, genes: np.ndarray | None = None) -> dict:
    """The ``effects`` of :func:`._perturbation_baselines._deltas` from stored pseudobulks (some contexts, genes)."""
    keep = slice(None) if genes is None else genes
    control = {c: bulks["control_bulk"][i][keep] for i, c in enumerate(bulks["contexts"])
               if contexts is None or c in contexts}  # fmt: skip
    perturbed = {(c, p): bulks["perturbed_bulk"][i][keep] for i, (c, p) in enumerate(bulks["pairs"]) if c in control}
    delta = {(c, p): bulk - control[c] for (c, p), bulk in perturbed.items()}
    return {"control": control, "perturbed": perturbed, "delta": delta}


def baseline_deltas(effects: dict, pairs: list[tuple[str, str]], target_bulk: dict,
                    baselines=PREDICTORS) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """Per baseline, the delta of each ``(context, perturbation)`` pair (perturbation_baselines' formulas)."""
    return {b: _deltas(b, pairs, effects, target_bulk, ALPHA)[0] for b in baselines}


def shifted_mean(control_cells: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Pseudobulk of a baseline's predicted cells: the mean of ``max(control cell + delta, 0)``."""
    return np.maximum(control_cells + delta, 0.0).mean(axis=0)


def simplex_least_squares(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """``argmin w'Gw − 2c'w`` over ``w ≥ 0, Σw = 1`` (exact: every support's equality-constrained solution).

    Ties (components predicting the same, e.g. context mean = perturbation mean with one
    perturbation) share the weight equally.
    """
    k = len(cross)
    gram = gram + 1e-10 * (np.trace(gram) / k + 1e-30) * np.eye(k)
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = gram[np.ix_(idx, idx)]
            system[:size, size] = system[size, :size] = 1.0
            solution = np.linalg.lstsq(system, np.r_[cross[idx], 1.0], rcond=None)[0][:size]
            if (solution < -1e-12).any():
                continue
            w = np.zeros(k)
            w[idx] = np.clip(solution, 0.0, None)
            w /= w.sum()
            value = w @ gram @ w - 2 * cross @ w
            if best is None or value < best_value - 1e-12 * max(1.0, abs(best_value)):
                best, best_value = w, value
    return best


def fit_weights(samples: dict[str, list[tuple[np.ndarray, np.ndarray]]], perturbations: list[str],
                n_components: int, *, fallback: int = 0) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Per perturbation, stacking weights from out-of-fold samples ``{perturbation: [(deltas, real delta)]}``.

    ``deltas``: components × genes (each component's predicted pseudobulk minus the context's
    control pseudobulk); ``real delta``: the real one (genes).

    Returns the weights (perturbations × components) and the out-of-fold mean squared error of each
    component and of the stack (with its own weights), over every sample. Without any sample (no
    perturbation measured in two folds), the component ``fallback`` takes every weight.
    """
    moments = {}
    for p, items in samples.items():
        gram = sum(d @ d.T / d.shape[1] for d, _ in items) / len(items)
        cross = sum(d @ r / d.shape[1] for d, r in items) / len(items)
        moments[p] = (gram, cross, len(items))
    if moments:
        total = sum(n for _, _, n in moments.values())
        pooled_gram = sum(g * n for g, _, n in moments.values()) / total
        pooled_cross = sum(c * n for _, c, n in moments.values()) / total
        shared = simplex_least_squares(pooled_gram, pooled_cross)
    else:
        pooled_gram, pooled_cross, shared = None, None, np.eye(n_components)[fallback]
    weights = np.tile(shared, (len(perturbations), 1))
    for i, p in enumerate(perturbations):
        if p in moments:
            gram, cross, n = moments[p]
            mix = n / (n + PRIOR_CONTEXTS)
            weights[i] = simplex_least_squares(mix * gram + (1 - mix) * pooled_gram,
                                               mix * cross + (1 - mix) * pooled_cross)  # fmt: skip
    errors = np.zeros(n_components + 1)
    count = 0
    for p, items in samples.items():
        w = weights[perturbations.index(p)]
        for d, r in items:
            errors[:-1] += ((d - r) ** 2).mean(axis=1)
            errors[-1] += ((w @ d - r) ** 2).mean()
            count += 1
    return weights, {"errors": (errors / max(count, 1)).tolist(), "n_samples": count}


def network_bulks(net, values, controls: dict, held: list[str], pairs: dict, known: set, perturbations,
                  set_size: int, to_genes, random_state: int) -> dict:  # fmt: skip
    """Pseudobulk (over the panel, log1p, ≥ 0) of a fold network's prediction of each held-out pair it knows."""
    out = {}
    for c, p in pairs:
        if c in held and p in known:
            inputs = values[controls[c]].numpy()
            cells = respond([net], inputs, perturbations.index(p), set_size, random_state=random_state)
            out[(c, p)] = to_genes(inputs, cells, controls[c]).astype(np.float64).mean(axis=0)
    return out


def fit_stack(adata, rows, pairs: dict, controls: dict, perturbations: list[str], folds: list[list[str]],
              oof: dict, panel: pd.Index, kind: str, layer) -> dict:  # fmt: skip
    """What ``PerturbationModel.stack`` holds: the training pseudobulks over every gene, and the weights.

    ``pairs`` and ``controls`` hold positions in ``rows`` (the training cells of ``adata``); ``oof``
    the fold networks' out-of-fold pseudobulks over the panel (:func:`network_bulks`). For each fold,
    the baselines are fitted on the other folds' pseudobulks and predict the fold's contexts from
    their control cells; the weights over the panel include the network, those of the other genes
    the baselines alone (:func:`fit_weights`).
    """
    names = pd.Index(adata.var_names.astype(str))
    expression = LogExpression(adata, names, layer=layer, what="adata", kind=kind)
    groups = {key: rows[r] for key, r in pairs.items()} | {(c, "__control__"): rows[r] for c, r in controls.items()}
    bulks = training_bulks(expression, groups, "__control__")
    in_panel = names.get_indexer(panel)
    rest = np.setdiff1d(np.arange(len(names)), in_panel) if len(panel) < len(names) else np.arange(len(names))
    full, baseline_only = {}, {}
    pair_index = {tuple(pair): i for i, pair in enumerate(bulks["pairs"])}
    for held in folds:
        effects = effects_of(bulks, contexts=[c for c in bulks["contexts"] if c not in held])
        known = {p for _, p in effects["delta"]}
        held_bulk = {c: bulks["control_bulk"][bulks["contexts"].index(c)] for c in held if c in bulks["contexts"]}
        targets = [(c, p) for (c, p) in pairs if c in held_bulk and p in known]
        if not targets:
            continue
        deltas = baseline_deltas(effects, targets, held_bulk)  # each component fitted once per fold
        cells = {c: expression.rows(groups[(c, "__control__")]) for c in {c for c, _ in targets}}
        for i, (c, p) in enumerate(targets):
            control_bulk = held_bulk[c]
            components = np.stack([shifted_mean(cells[c], deltas[b][i]) for b in PREDICTORS])
            components -= control_bulk
            real = bulks["perturbed_bulk"][pair_index[(c, p)]] - control_bulk
            baseline_only.setdefault(p, []).append((components[:, rest], real[rest]))
            if (c, p) in oof:
                network = oof[(c, p)] - control_bulk[in_panel]
                full.setdefault(p, []).append((np.vstack([network, components[:, in_panel]]), real[in_panel]))
    weights, full_errors = fit_weights(full, perturbations, len(COMPONENTS), fallback=0)
    baseline_weights, rest_errors = fit_weights(baseline_only, perturbations, len(PREDICTORS),
                                                fallback=PREDICTORS.index("perturbation_mean"))  # fmt: skip
    return {"genes": list(names), "contexts": bulks["contexts"], "pairs": bulks["pairs"],
            "control_bulk": bulks["control_bulk"], "perturbed_bulk": bulks["perturbed_bulk"],
            "weights": weights, "baseline_weights": baseline_weights, "components": list(COMPONENTS),
            "alpha": ALPHA, "folds": folds,
            "out_of_fold": {"panel": dict(zip([*COMPONENTS, "stack"], full_errors["errors"], strict=True)),
                            "other_genes": dict(zip([*PREDICTORS, "stack"], rest_errors["errors"],
                                                    strict=True)),
                            "n_samples": full_errors["n_samples"], "n_other_genes": len(rest)}}  # fmt: skip
