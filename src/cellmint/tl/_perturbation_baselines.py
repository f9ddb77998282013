"""``cm.tl.perturbation_baselines``: simple predictions of perturbed cells that a model has to beat.

Every baseline shifts the control cells of the target context by a delta in log1p-normalised
expression (``predicted cell = max(control cell + delta, 0)``); the baselines differ in the delta:

- ``control``: none (the perturbation does nothing);
- ``perturbation_mean``: the perturbation's average effect over the training contexts;
- ``context_mean``: the average effect of all perturbations in the target context (or, for a context
  unseen in training, of all training perturbations: cell-eval's "mean" baseline);
- ``linear``: per perturbation, a ridge regression from a context's control pseudobulk to its
  perturbed pseudobulk, fitted on the training contexts.

One more predictor of the same form is not a baseline but a component of the stacked model
(:mod:`._perturbation_stack`): ``pls``, a partial-least-squares regression from a context's control
pseudobulk to the effects of every perturbation at once, so that contexts share what they show
about how a context's state shapes its responses. It is not among the baselines that set the zero
of the scaled scores (:func:`~cellmint.tl.evaluate_perturbation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._utils._docs import doc_params
from ._perturbation_data import ALL_CELLS, LogExpression, cell_groups

BASELINES = ("control", "perturbation_mean", "context_mean", "linear")
#: every predictor of this module: the baselines and the stack's ``pls`` component
PREDICTORS = (*BASELINES, "pls")
#: baselines that need the perturbation among the training cells
NEED_PERTURBATION = ("perturbation_mean", "linear", "pls")
#: latent components of the ``pls`` predictor (at most the training contexts less two: with two or fewer, whose
#: inner folds would fit it on one context, it is the perturbation mean)
PLS_COMPONENTS = 3


def _targets(perturbations, contexts: list[str], context_key: str | None) -> list[tuple[str, str]]:
    items = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    if items and all(isinstance(item, tuple) for item in items):
        if any(len(item) != 2 for item in items):
            raise ValueError("perturbations must be labels or (context, perturbation) pairs.")
        pairs = [(ALL_CELLS if context_key is None else str(c), str(p)) for c, p in items]
        unknown = sorted({c for c, _ in pairs} - set(contexts))
        if unknown:
            raise ValueError(f"No control cells in `controls` for the contexts {unknown[:10]}; found {contexts[:10]}.")
        return list(dict.fromkeys(pairs))
    return [(c, str(p)) for c in contexts for p in dict.fromkeys(items)]


@doc_params()
def perturbation_baselines(
    train: ad.AnnData | None,
    controls: ad.AnnData,
    perturbations: Sequence[str] | Sequence[tuple[str, str]],
    *,
    perturbation_key: str,
    control: str,
    context_key: str | None = None,
    baselines: Sequence[str] = BASELINES,
    layer: str | None = None,
    alpha: float = 1.0,
) -> dict[str, ad.AnnData]:
    """Predict perturbed cells with simple baselines: the control cells of a context shifted by a delta.

    Every baseline predicts one perturbed cell per control cell of the target context,
    ``max(control cell + delta, 0)`` in log1p-normalised expression, with the delta of the
    baseline (pseudobulk = mean log1p value over cells; effect = perturbed − control pseudobulk of
    the same training context):

    - ``"control"``: delta 0;
    - ``"perturbation_mean"``: the effect of the perturbation averaged over the training contexts
      where it was measured;
    - ``"context_mean"``: the average effect of the perturbations measured in the target context in
      ``train``; for a context without perturbed training cells, the average effect of all training
      perturbations and contexts (cell-eval's ``mean`` baseline);
    - ``"linear"``: per perturbation, a ridge regression (:class:`sklearn.linear_model.Ridge`) from
      the control pseudobulk of each training context to its perturbed pseudobulk, applied to the
      target context's control pseudobulk (delta = prediction − that pseudobulk);
    - ``"pls"`` (not computed by default; a component of
      :func:`~cellmint.tl.train_perturbation`'s stack, not a simple baseline): one
      partial-least-squares regression (the model of
      :class:`sklearn.cross_decomposition.PLSRegression` with ``scale=False``, solved exactly;
      ``min(3, training contexts − 2)`` components) from the control pseudobulk of each
      training context to the effects of every training perturbation at once, applied to the
      target context's control pseudobulk. The latent directions are those along which the
      contexts' controls predict all responses together. An effect not measured in a context is
      taken as the perturbation's mean effect over the contexts where it was. With two training
      contexts or fewer, ``pls`` is the perturbation mean: a line through two contexts is an
      extrapolation that the stack's inner folds (fitted on one context) could not have checked.

    A training context's control pseudobulk comes from its control cells in ``train``, or, when
    ``train`` has none, from its cells in ``controls``; contexts with neither are not used.

    Parameters
    ----------
    train
        Training cells (control and perturbed cells of the training contexts), raw counts or
        log1p-normalised values. Only the ``control`` baseline may do without (``None``).
    controls
        Control cells of the target contexts; the output genes are its genes. When it has
        ``obs[perturbation_key]``, only the cells labelled ``control`` are used.
    perturbations
        What to predict: perturbation labels (predicted in every context of ``controls``) or
        ``(context, perturbation)`` pairs.
    perturbation_key
        ``obs`` column of the perturbation labels.
    control
        The label of control cells in ``obs[perturbation_key]``.
    context_key
        ``obs`` column of the context (cell line, patient, donor); ``None``: one context.
    baselines
        Which baselines to compute, among ``"control"``, ``"perturbation_mean"``,
        ``"context_mean"``, ``"linear"`` and ``"pls"``. ``perturbation_mean``, ``linear`` and
        ``pls`` need each perturbation in ``train``: a perturbation never seen there is an error
        naming it.
    {doc_layer} The same layer is read from ``train`` and ``controls``.
    alpha
        Ridge penalty of the ``linear`` baseline.

    Returns
    -------
    ``{{baseline: AnnData}}`` in :func:`~cellmint.tl.predict_perturbation`'s format, log1p-normalised
    values in ``X`` (float32, the genes of ``controls``): the control cells of each target context
    (``obs["is_predicted"]`` False), then, per ``(context, perturbation)`` pair, one predicted cell
    per control cell (``is_predicted`` True), with ``obs[perturbation_key]``,
    ``obs[context_key]`` and ``obs["source_cell"]`` (the control cell each was made from).
    ``uns["perturbation_baseline"]`` holds the baseline's name, its
    parameters and, for ``context_mean``, ``"source"``: per context, ``"context"`` or ``"all"``
    (which average was used).
    """
    unknown = [b for b in baselines if b not in PREDICTORS]
    if unknown or not baselines:
        raise ValueError(f"baselines must be among {PREDICTORS}, not {list(baselines)}.")
    if train is None and any(b != "control" for b in baselines):
        raise ValueError(f"The baselines {[b for b in baselines if b != 'control']} need train=.")
    genes = pd.Index(controls.var_names.astype(str))
    target = LogExpression(controls, genes, layer=layer, what="controls")
    obs = controls.obs
    if perturbation_key not in obs.columns:
        obs = obs.assign(**{perturbation_key: str(control)})
    groups = cell_groups(obs, perturbation_key, context_key, what="controls")
    control_groups = {key: rows for key, rows in groups.items() if key[1] == str(control)}
    if not control_groups:
        raise ValueError(f"`controls` has no cells labelled {control!r} in obs[{perturbation_key!r}].")
    target_rows = {c: rows for (c, _), rows in control_groups.items()}
    pairs = _targets(perturbations, sorted(target_rows), context_key)
    target_bulk = {c: target.mean(rows) for c, rows in target_rows.items()}
    effects = {} if train is None else _training_effects(train, genes, perturbation_key, str(control), context_key,
                                                         layer, target_bulk)  # fmt: skip
    needed = [b for b in baselines if b in NEED_PERTURBATION]
    seen = {p for _, p in effects.get("delta", {})}
    missing = sorted({p for _, p in pairs} - seen) if needed else []
    if missing:
        raise ValueError(f"The baselines {needed} need each perturbation in train (with control cells in its "
                         f"context); not found there: {missing[:10]}.")  # fmt: skip
    out = {}
    for baseline in baselines:
        deltas, source = _deltas(baseline, pairs, effects, target_bulk, alpha)
        out[baseline] = _assemble(baseline, pairs, deltas, target, target_rows, controls, genes,
                                  perturbation_key=perturbation_key, control=str(control), context_key=context_key,
                                  params={"alpha": alpha, "layer": layer}, source=source)  # fmt: skip
    return out


def _training_effects(train, genes, perturbation_key, control, context_key, layer, target_bulk) -> dict:
    """Training pseudobulks: ``control[c]``, ``perturbed[(c, p)]`` and ``delta[(c, p)]`` (usable contexts only)."""
    expression = LogExpression(train, genes, layer=layer, what="train")
    groups = cell_groups(train.obs, perturbation_key, context_key, what="train")
    control_bulk = {c: expression.mean(rows) for (c, p), rows in groups.items() if p == control}
    for c, bulk in target_bulk.items():
        control_bulk.setdefault(c, bulk)
    perturbed = {(c, p): expression.mean(rows) for (c, p), rows in groups.items() if p != control and c in control_bulk}
    delta = {(c, p): bulk - control_bulk[c] for (c, p), bulk in perturbed.items()}
    return {"control": control_bulk, "perturbed": perturbed, "delta": delta}


def _deltas(baseline: str, pairs, effects: dict, target_bulk: dict, alpha: float) -> tuple[list[np.ndarray], dict]:
    n_genes = len(next(iter(target_bulk.values())))
    if baseline == "control":
        return [np.zeros(n_genes) for _ in pairs], {}
    delta = effects["delta"]
    if baseline == "perturbation_mean":
        mean = _mean_effects(delta, [p for _, p in pairs])
        return [mean[p] for _, p in pairs], {}
    if baseline == "context_mean":
        if not delta:
            raise ValueError("context_mean needs perturbed cells in train (with control cells in their context).")
        overall = np.mean(list(delta.values()), axis=0)
        per_context = {c: np.mean([d for (k, _), d in delta.items() if k == c], axis=0) for c in {c for c, _ in delta}}
        source = {c: "context" if c in per_context else "all" for c, _ in pairs}
        return [per_context.get(c, overall) for c, _ in pairs], source
    if baseline == "pls":
        return _pls_deltas(pairs, effects, target_bulk), {}
    from sklearn.linear_model import Ridge

    models = {}
    for p in dict.fromkeys(p for _, p in pairs):
        contexts = [c for c, q in effects["perturbed"] if q == p]
        x = np.stack([effects["control"][c] for c in contexts])
        y = np.stack([effects["perturbed"][(c, p)] for c in contexts])
        models[p] = Ridge(alpha=alpha).fit(x, y)
    return [models[p].predict(target_bulk[c][None, :])[0] - target_bulk[c] for c, p in pairs], {}


def _mean_effects(delta: dict, perturbations) -> dict[str, np.ndarray]:
    """Each perturbation's effect averaged over the training contexts where it was measured."""
    return {p: np.mean([d for (_, q), d in delta.items() if q == p], axis=0) for p in dict.fromkeys(perturbations)}


def _pls_deltas(pairs, effects: dict, target_bulk: dict) -> list[np.ndarray]:
    """The ``pls`` predictor: one PLS regression from control pseudobulk to every perturbation's effect."""
    delta = effects["delta"]
    perturbations = list(dict.fromkeys(p for _, p in sorted(delta)))
    contexts = list(dict.fromkeys(c for c, _ in sorted(delta)))
    mean = _mean_effects(delta, perturbations)
    n_genes = len(mean[perturbations[0]])
    # contexts × (perturbations · genes): each context's effects side by side, the mean where one was not measured
    y = np.stack([np.concatenate([delta.get((c, p), mean[p]) for p in perturbations]) for c in contexts])
    x = np.stack([effects["control"][c] for c in contexts])
    fitted = pls_fit(x, y, min(PLS_COMPONENTS, len(contexts) - 2))
    if fitted is None:  # two contexts or fewer, or contexts that do not differ: the mean effect
        return [mean[p] for _, p in pairs]
    targets = list(dict.fromkeys(c for c, _ in pairs))
    predicted = dict(zip(targets, pls_predict(fitted, np.stack([target_bulk[c] for c in targets])), strict=True))
    return [predicted[c].reshape(len(perturbations), n_genes)[perturbations.index(p)] for c, p in pairs]


def pls_fit(x: np.ndarray, y: np.ndarray, n_components: int) -> dict | None:
    """PLS regression of ``y`` on ``x`` (few rows, many columns), unscaled; None when nothing can be learned.

    The NIPALS model of :class:`sklearn.cross_decomposition.PLSRegression` (``scale=False``), solved
    exactly rather than iterated: each component's weight vector is the leading left singular vector
    of ``X_kᵀY_k`` (``X_k``, ``Y_k`` deflated by the previous scores), found through the rows' ``n × n``
    matrices since the rows (contexts) are few and the columns (genes; perturbations × genes) many.
    Exact, so the result does not depend on the order of the columns (iteration would, at its
    tolerance). Components: at most ``n_components`` and the directions the centred rows span.
    """
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram_y = yc @ yc.T  # n × n: what the weights need of Y, deflated alongside X
    n_components = min(n_components, _rank(xc @ xc.T), _rank(gram_y))
    if n_components < 1:
        return None
    weights, loadings, scores = [], [], []
    xk = xc.copy()
    for _ in range(n_components):
        u, sing, vt = np.linalg.svd(xk, full_matrices=False)
        keep = sing > sing[0] * 1e-10
        u, sing, vt = u[:, keep], sing[keep], vt[keep]
        # X_kᵀY_k = vtᵀ · (sing · uᵀY_k): its leading left singular vector is vtᵀ times that of the small factor
        small = (sing[:, None] * u.T) @ gram_y @ (u * sing[None, :])
        w = vt.T @ np.linalg.eigh(small)[1][:, -1]
        t = xk @ w
        tt = t @ t
        loading = xk.T @ t / tt
        xk -= np.outer(t, loading)
        project = np.eye(len(t)) - np.outer(t, t) / tt
        gram_y = project @ gram_y @ project
        weights.append(w), loadings.append(loading), scores.append(t)
    w, loading, t = (np.stack(v, axis=1) for v in (weights, loadings, scores))
    rotation = w @ np.linalg.inv(loading.T @ w)  # p × k: centred rows to scores
    coefficients = np.linalg.solve(t.T @ t, t.T @ yc)  # k × q: scores to centred responses
    return {"x_mean": x_mean, "y_mean": y_mean, "rotation": rotation, "coefficients": coefficients}


def _rank(gram: np.ndarray) -> int:
    """Directions spanned by a matrix's rows, from their ``n × n`` Gram matrix (singular values ≥ 1e-6 · largest)."""
    eigenvalues = np.linalg.eigvalsh(gram)
    return int((eigenvalues > eigenvalues[-1] * 1e-12).sum()) if eigenvalues[-1] > 0 else 0


def pls_predict(fitted: dict, x: np.ndarray) -> np.ndarray:
    """Responses of new rows under :func:`pls_fit`'s model."""
    return fitted["y_mean"] + ((x - fitted["x_mean"]) @ fitted["rotation"]) @ fitted["coefficients"]


def _assemble(baseline, pairs, deltas, target, target_rows, controls, genes, *, perturbation_key, control,
              context_key, params, source) -> ad.AnnData:  # fmt: skip
    contexts = list(dict.fromkeys(c for c, _ in pairs))
    blocks, names, context, perturbation, predicted, made_from = [], [], [], [], [], []
    cells = controls.obs_names.astype(str).to_numpy()
    for c in contexts:
        rows = target_rows[c]
        blocks.append(target.rows(rows).astype(np.float32))
        names += list(cells[rows])
        made_from += list(cells[rows])
        context += [c] * len(rows)
        perturbation += [control] * len(rows)
        predicted += [False] * len(rows)
    for (c, p), delta in zip(pairs, deltas, strict=True):
        rows = target_rows[c]
        blocks.append(np.maximum(target.rows(rows) + delta, 0.0).astype(np.float32))
        names += [f"{cell}-{p}" for cell in cells[rows]]
        made_from += list(cells[rows])
        context += [c] * len(rows)
        perturbation += [p] * len(rows)
        predicted += [True] * len(rows)
    index = pd.Index(names, dtype=str)
    if not index.is_unique:  # repeated cell names in `controls`: number the cells
        index = pd.Index([f"{name}#{i}" for i, name in enumerate(names)], dtype=str)
    obs = pd.DataFrame({perturbation_key: pd.Categorical(perturbation)}, index=index)
    if context_key is not None:
        obs[context_key] = pd.Categorical(context)
    obs[Key.obs.is_predicted] = np.asarray(predicted, dtype=bool)
    obs[Key.obs.source_cell] = pd.Categorical(made_from)
    adata = ad.AnnData(np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["perturbation_baseline"] = {"method": baseline, "params": {k: v for k, v in params.items()
                                                                         if v is not None}}  # fmt: skip
    if source:
        adata.uns["perturbation_baseline"]["source"] = source
    return adata
