"""The generative model behind :func:`cellmint.datasets.synthetic`, and its fast exact sampler.

Exact negative-binomial counts without touching every cell × gene entry: the work grows with the
number of counts, not with ``n_obs × n_vars``. For every cell a Poisson stream of *proposals* over
genes is drawn (Walker alias tables, O(1) per draw) from an envelope of the cell's expression
profile, sorted into (cell, gene) pairs, thinned to the Poisson number of *clusters* of a negative
binomial, and every cluster gets a logarithmic size (Quenouille: a Poisson number of logarithmic
variables is negative binomial). Cells come in fixed blocks, each seeded by ``(random_state, block)``,
so the matrix does not depend on chunking, threads, or whether it is kept in memory or streamed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Version of the generative model; bumped whenever a seed would give different numbers.
MODEL_VERSION = 1

# Fixed model constants (documented in the docstring of :func:`synthetic`).
_GENE_LOG_SD = 2.2  # sd of the natural log of baseline gene abundances
_LIBRARY_LOG_SD = 0.4  # cell-to-cell sd of log library size within a cell type and batch
_TYPE_SIZE_LOG_SD = 0.25  # cell types differ in RNA content
_BATCH_DEPTH_LOG_SD = 0.2  # batches are sequenced to different depths
_TYPE_PROGRAM_FRACTION = 0.02  # genes per cell-type program, as a fraction of n_vars
_SUBTYPE_PROGRAM_RATIO = 0.25  # genes per subtype program, relative to a type program
_TYPE_LOG2FC = (np.log2(3.0), 3.0)  # cell-type programs: 3-8 fold up
_SUBTYPE_LOG2FC = (1.0, 2.0)  # subtype programs: 2-4 fold up
_PERTURBATION_FRACTION = 0.005  # genes a perturbation moves, as a fraction of n_vars (at least 5)
_HOUSEKEEPING_QUANTILE = 0.95  # non-program genes above this baseline quantile are "housekeeping"
_CONTROL_FRACTION = 0.5  # cells without a perturbation when n_perturbations > 0
_BLOCK_COUNTS = 1 << 21  # expected counts per seeded block of cells
_MAX_BLOCK_ROWS = 1024
_MAX_CLUSTER = float(2**24)  # cap of one logarithmic cluster (float32 counts are exact up to 2**24)
_STREAM_MODEL, _STREAM_LABELS, _STREAM_BLOCKS = 0, 1, 2  # seed streams: (random_state, stream[, block])
#: seed stream of the donor states and context-dependent responses (drawn only when context_response > 0, so
#: the other streams, and every output of earlier arguments, are unchanged)
_STREAM_CONTEXT = 3
_STATE_DIM = 2  # dimensions of a donor's latent state
_STATE_FRACTION = 0.01  # genes per state program (one per dimension), as a fraction of n_vars (at least 4)
_STATE_LOG2FC = 1.0  # log2 fold change of a state program's genes per unit of the donor's state


@dataclass
class _Model:
    """Everything a block of cells needs. Profiles ``subtype * n_batches + batch`` index the proposal tables."""

    n_vars: int
    n_batches: int
    dispersion: float
    mean_library_size: float
    type_of_subtype: np.ndarray  # (n_s,)
    batch_of_donor: np.ndarray  # (n_donors,)
    type_size: np.ndarray  # (n_types,) library size factor, mean 1
    batch_depth: np.ndarray  # (n_batches,) library size factor, mean 1
    norm: np.ndarray  # (n_s, n_donors): sum_g w_sg * e_dg
    proposal: np.ndarray  # (n_s * n_batches * G,) float32 w_sg * env_bg, flat
    proposal_total: np.ndarray  # (n_s * n_batches,) row sums of proposal
    prob: np.ndarray  # (n_s * n_batches, G) float32 alias acceptance
    alias: np.ndarray  # (n_s * n_batches, G) int32 alias target
    ratio: np.ndarray  # (n_donors * G,) float32 e_dg / env_bg <= 1, flat
    target_keys: np.ndarray  # sorted int64 code * G + gene (code 0 is control; see code_stride)
    target_fold: np.ndarray  # fold change of each target key
    target_mask: np.ndarray  # (G,) bool: target of some perturbation
    up_ptr: np.ndarray  # (n_codes + 1,) pointer over response code into up_genes / up_extra
    up_genes: np.ndarray  # up-regulated targets, grouped by response code
    up_extra: np.ndarray  # their fold change - 1
    #: a perturbed cell's response code: its perturbation index (0: the same response in every donor), or
    #: ``donor * code_stride + perturbation`` when responses differ by donor; controls have code 0
    code_stride: int = 0

    def response_codes(self, pert: np.ndarray, donor: np.ndarray) -> np.ndarray:
        if not self.code_stride:
            return pert
        return np.where(pert > 0, donor * self.code_stride + pert, 0)


# --------------------------------------------------------------------------------------------------
# model parameters


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """``k`` indices without replacement, successive draws proportional to ``weights`` (0: never drawn)."""
    with np.errstate(divide="ignore"):
        keys = rng.exponential(size=weights.size) / weights
    return np.argsort(keys, kind="stable")[:k]


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias table of a probability vector (entries >= 0, sum 1), vectorised.

    Vose's pairing, laid out on a line: the deficits ``1 - n p_i`` of the small columns, one after
    the other, are filled from the excesses ``n p_j - 1`` of the large ones, one after the other. A
    small column takes its alias from the large one whose excess covers the start of its deficit; a
    large column whose excess ends inside a small one's deficit gives that overshoot too, so its own
    height drops below 1 and the next large column fills it.
    """
    n = p.size
    h = p * n
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int32)
    is_small = h < 1.0
    small, large = np.flatnonzero(is_small), np.flatnonzero(~is_small)
    if small.size == 0 or large.size == 0:
        return prob, alias
    deficit = 1.0 - h[small]
    d_end = np.cumsum(deficit)
    d_start = d_end - deficit
    e_end = np.cumsum(h[large] - 1.0)
    prob[small] = h[small]
    alias[small] = large[np.minimum(np.searchsorted(e_end, d_start, side="right"), large.size - 1)]
    # large columns (all but the last) whose excess ends strictly inside a small column's deficit
    j = np.arange(large.size - 1)
    i = np.searchsorted(d_end, e_end[:-1], side="right")
    inside = i < small.size
    j, i = j[inside], i[inside]
    inside = e_end[j] > d_start[i]
    j, i = j[inside], i[inside]
    prob[large[j]] = np.clip(1.0 - (d_end[i] - e_end[j]), 0.0, 1.0)
    alias[large[j]] = large[j + 1]
    return prob, alias


def _program_sizes(n_vars: int, n_types: int, n_subtypes: int) -> tuple[int, int]:
    type_size = max(1, round(_TYPE_PROGRAM_FRACTION * n_vars))
    sub_size = max(1, round(_SUBTYPE_PROGRAM_RATIO * type_size))
    budget = n_vars // 2  # programs never take more than half of the genes (nor housekeeping genes)
    while n_types * (type_size + n_subtypes * sub_size) > budget and (type_size > 0 or sub_size > 0):
        type_size = max(0, type_size - max(1, type_size // 8))
        sub_size = min(sub_size, max(0, round(_SUBTYPE_PROGRAM_RATIO * type_size)))
    return type_size, sub_size


def _build_model(
    rng: np.random.Generator,
    *,
    n_vars: int,
    n_cell_types: int,
    n_subtypes: int,
    n_donors: int,
    n_batches: int,
    n_perturbations: int,
    perturbation_effect: float,
    mean_library_size: float,
    dispersion: float,
    donor_effect: float,
    batch_effect: float,
    context_response: float = 0.0,
    context_rng: np.random.Generator | None = None,
    perturbation_fraction: float = _PERTURBATION_FRACTION,
) -> tuple[_Model, dict]:
    G = n_vars
    n_s = n_cell_types * n_subtypes
    base = np.exp(rng.normal(0.0, _GENE_LOG_SD, G))
    pick_weight = np.sqrt(base)  # programs and perturbations favour expressed genes

    # the most abundant genes are housekeeping genes, the same in every cell type
    housekeeping = base > np.quantile(base, _HOUSEKEEPING_QUANTILE)
    # cell-type and subtype programs: disjoint gene sets, outside the housekeeping genes
    type_size, sub_size = _program_sizes(G, n_cell_types, n_subtypes)
    chosen = _weighted_sample(rng, np.where(housekeeping, 0.0, pick_weight), n_cell_types * type_size + n_s * sub_size)
    type_genes = chosen[: n_cell_types * type_size].reshape(n_cell_types, type_size)
    sub_genes = chosen[n_cell_types * type_size :].reshape(n_s, sub_size)
    type_lfc = rng.uniform(*_TYPE_LOG2FC, size=type_genes.shape)
    sub_lfc = rng.uniform(*_SUBTYPE_LOG2FC, size=sub_genes.shape)
    type_of_subtype = np.repeat(np.arange(n_cell_types), n_subtypes)
    w = np.tile(base, (n_s, 1))
    rows = np.arange(n_s)[:, None]
    w[rows, type_genes[type_of_subtype]] *= 2.0 ** type_lfc[type_of_subtype]
    w[rows, sub_genes] *= 2.0**sub_lfc

    program = np.full(G, "none", dtype=object)
    program_lfc = np.zeros(G, dtype=np.float32)
    program[housekeeping] = "housekeeping"
    for t in range(n_cell_types):
        program[type_genes[t]] = f"type_{t}"
        program_lfc[type_genes[t]] = type_lfc[t]
    for s in range(n_s):
        program[sub_genes[s]] = f"type_{s // n_subtypes}.sub_{s % n_subtypes}"
        program_lfc[sub_genes[s]] = sub_lfc[s]
    program_categories = (
        ["none", "housekeeping"]
        + [f"type_{t}" for t in range(n_cell_types)]
        + [f"type_{t}.sub_{j}" for t in range(n_cell_types) for j in range(n_subtypes)]
    )
    program = pd.Categorical(program, categories=program_categories)

    # donors nested in batches; each has a small multiplicative effect on every gene
    batch_of_donor = np.arange(n_donors) % n_batches
    e_batch = np.exp(batch_effect * rng.standard_normal((n_batches, G)))
    e_donor = np.exp(donor_effect * rng.standard_normal((n_donors, G)))
    e = e_donor * e_batch[batch_of_donor]
    context = None
    if context_response > 0:
        context = _donor_states(context_rng, n_donors, pick_weight, np.asarray(program) == "none")
        e = e * context["expression_factor"]
    env = np.stack([e[batch_of_donor == b].max(axis=0) for b in range(n_batches)])  # (n_batches, G)

    type_size_f = np.exp(_TYPE_SIZE_LOG_SD * rng.standard_normal(n_cell_types))
    batch_depth = np.exp(_BATCH_DEPTH_LOG_SD * rng.standard_normal(n_batches))
    type_size_f /= type_size_f.mean()
    batch_depth /= batch_depth.mean()

    # perturbations: each moves its own gene set, up and down; the other genes keep their counts
    norm = w @ e.T  # (n_s, n_donors): sum_g w_sg * e_dg
    n_de = min(G, max(5, round(perturbation_fraction * G))) if n_perturbations else 0
    pert_genes, pert_lfc, folds = [], [], []
    for _ in range(n_perturbations):
        genes = np.sort(_weighted_sample(rng, pick_weight, n_de))
        strength = rng.uniform(0.5, 1.5)
        sign = np.where(rng.random(n_de) < 0.5, 1.0, -1.0)
        lfc = perturbation_effect * strength * sign * np.exp(0.3 * rng.standard_normal(n_de))
        fold = 2.0**lfc
        pert_genes.append(genes)
        pert_lfc.append(lfc)
        folds.append(fold)
    code_stride, by_donor = 0, None
    if context is not None and n_perturbations:
        pert_genes, pert_lfc, by_donor = _context_responses(context_rng, context, pert_genes, pert_lfc, pick_weight,
                                                            perturbation_effect, context_response)  # fmt: skip
        code_stride = n_perturbations + 1
        codes = [d * code_stride + p + 1 for d in range(n_donors) for p in range(n_perturbations)]
        index = np.concatenate([np.full(len(pert_genes[c % code_stride - 1]), c) for c in codes])
        genes = np.concatenate([pert_genes[c % code_stride - 1] for c in codes])
        fold = 2.0 ** np.concatenate([by_donor[c % code_stride - 1][c // code_stride] for c in codes])
        n_codes = n_donors * code_stride
    elif n_perturbations:
        index = np.repeat(np.arange(1, n_perturbations + 1), n_de)
        genes, fold = np.concatenate(pert_genes), np.concatenate(folds)
        n_codes = n_perturbations + 1
    else:
        index, genes, fold = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        n_codes = 1
    target_keys = index * np.int64(G) + genes  # sorted: by response code, then gene
    target_mask = np.zeros(G, dtype=bool)
    target_mask[genes] = True
    up = fold > 1.0
    up_ptr = np.zeros(n_codes + 1, dtype=np.int64)
    up_ptr[1:] = np.cumsum(np.bincount(index[up], minlength=n_codes))

    # proposal tables: one per (subtype, batch) profile, over the envelope of its donors
    proposal = (w[:, None, :] * env[None, :, :]).reshape(n_s * n_batches, G)
    proposal_total = proposal.sum(axis=1)
    prob = np.empty(proposal.shape, dtype=np.float32)
    alias = np.empty(proposal.shape, dtype=np.int32)
    for r in range(proposal.shape[0]):
        prob[r], alias[r] = _alias_table(proposal[r] / proposal_total[r])

    model = _Model(
        n_vars=G,
        n_batches=n_batches,
        dispersion=float(dispersion),
        mean_library_size=float(mean_library_size),
        type_of_subtype=type_of_subtype,
        batch_of_donor=batch_of_donor,
        type_size=type_size_f,
        batch_depth=batch_depth,
        norm=norm,
        proposal=proposal.astype(np.float32).ravel(),
        proposal_total=proposal_total,
        prob=prob,
        alias=alias,
        ratio=(e / env[batch_of_donor]).astype(np.float32).ravel(),
        target_keys=target_keys,
        target_fold=fold,
        target_mask=target_mask,
        up_ptr=up_ptr,
        up_genes=genes[up],
        up_extra=fold[up] - 1.0,
        code_stride=code_stride,
    )
    extras = {
        "program": program,
        "program_log2fc": program_lfc,
        "perturbation_genes": pert_genes,
        "perturbation_log2fc": pert_lfc,
    }
    if context is not None:
        extras |= {"donor_state": context["state"], "state_genes": context["genes"],
                   "perturbation_log2fc_by_donor": by_donor}  # fmt: skip
    return model, extras


def _donor_states(rng: np.random.Generator, n_donors: int, pick_weight: np.ndarray, free: np.ndarray) -> dict:
    """Each donor's latent state (n_donors × _STATE_DIM, standard normal) and how it shows in its cells.

    One state program per dimension (``_STATE_FRACTION`` of the genes, outside the cell-type and
    housekeeping programs): a donor's cells express the program's genes ``2 ** (_STATE_LOG2FC · state)``
    fold, so the state can be read from the donor's control cells.
    """
    state = rng.standard_normal((n_donors, _STATE_DIM))
    size = max(4, round(_STATE_FRACTION * pick_weight.size))
    chosen = _weighted_sample(rng, np.where(free, pick_weight, 0.0), _STATE_DIM * size).reshape(_STATE_DIM, size)
    factor = np.ones((n_donors, pick_weight.size))
    for k in range(_STATE_DIM):
        factor[:, chosen[k]] = 2.0 ** (_STATE_LOG2FC * state[:, k : k + 1])
    return {"state": state, "genes": np.sort(chosen, axis=1), "expression_factor": factor}


def _context_responses(rng, context: dict, pert_genes: list, pert_lfc: list, pick_weight: np.ndarray,
                       effect: float, strength: float) -> tuple[list, list, list]:  # fmt: skip
    """Per perturbation and donor, the log2 fold changes of the genes it moves, depending on the donor's state.

    Every perturbation's response is modulated by the same donor states (shared structure), along
    its own directions ``a``, ``b`` (standard normal, scaled by 1/√dim):

    - its own genes: ``lfc · 2 ** (strength · a·state)`` (a donor responds more or less strongly);
    - as many *conditional* genes (not its own): ``strength · effect · u · (b·state)`` with ``|u|``
      log-normal (sd 0.3) and a random sign: they move up in some donors and down in others, so
      their average over donors is near 0.

    Returns the genes (own and conditional, sorted), their log2 fold changes at state 0 (the
    conditional genes' are 0) and ``by_donor``: per perturbation an (n_donors × genes) array.
    """
    state = context["state"]
    genes_out, lfc_out, by_donor = [], [], []
    for genes, lfc in zip(pert_genes, pert_lfc, strict=True):
        a, b = rng.standard_normal((2, state.shape[1])) / np.sqrt(state.shape[1])
        weight = pick_weight.copy()
        weight[genes] = 0.0
        conditional = np.sort(_weighted_sample(rng, weight, len(genes)))
        u = np.where(rng.random(len(genes)) < 0.5, 1.0, -1.0) * np.exp(0.3 * rng.standard_normal(len(genes)))
        own = lfc[None, :] * 2.0 ** (strength * (state @ a))[:, None]
        cond = strength * effect * u[None, :] * (state @ b)[:, None]
        every = np.concatenate([genes, conditional])
        order = np.argsort(every)
        genes_out.append(every[order])
        lfc_out.append(np.concatenate([lfc, np.zeros(len(genes))])[order])
        by_donor.append(np.concatenate([own, cond], axis=1)[:, order])
    return genes_out, lfc_out, by_donor


# --------------------------------------------------------------------------------------------------
# cell labels


def _labels(
    rng: np.random.Generator, n_obs: int, *, n_cell_types: int, n_subtypes: int, n_donors: int, n_perturbations: int
) -> dict[str, np.ndarray]:
    donor_p = rng.dirichlet(np.full(n_donors, 5.0))
    type_p = rng.dirichlet(np.full(n_cell_types, 2.0))
    donor_type_p = rng.dirichlet(30.0 * type_p + 1e-3, size=n_donors)  # composition varies by donor
    sub_p = rng.dirichlet(np.full(n_subtypes, 3.0), size=n_cell_types)

    donor = rng.choice(n_donors, size=n_obs, p=donor_p).astype(np.int32)
    ctype = np.empty(n_obs, dtype=np.int32)
    for d in range(n_donors):
        idx = np.flatnonzero(donor == d)
        ctype[idx] = rng.choice(n_cell_types, size=idx.size, p=donor_type_p[d])
    sub = np.empty(n_obs, dtype=np.int32)
    for t in range(n_cell_types):
        idx = np.flatnonzero(ctype == t)
        sub[idx] = t * n_subtypes + rng.choice(n_subtypes, size=idx.size, p=sub_p[t])
    if n_perturbations:
        pert = np.where(rng.random(n_obs) < _CONTROL_FRACTION, 0, 1 + rng.integers(0, n_perturbations, n_obs)).astype(
            np.int32
        )
    else:
        pert = np.zeros(n_obs, dtype=np.int32)
    return {"donor": donor, "cell_type": ctype, "subtype": sub, "perturbation": pert}


# --------------------------------------------------------------------------------------------------
# counts, one seeded block of cells at a time


def _logseries_tail(rng: np.random.Generator, v: np.ndarray, phimu: np.ndarray) -> np.ndarray:
    """Logarithmic(p) variates, ``p = phimu / (1 + phimu)``, given Kemp's first uniform ``v < p``.

    Kemp's (1981) algorithm LK, vectorised: with "1 when ``v >= p``" it is numpy's ``logseries``.
    ``log(1 - p)`` is computed as ``-log1p(phimu)``, accurate when ``p`` is close to 1.
    """
    u = rng.random(v.size)
    q = -np.expm1(-np.log1p(phimu.astype(np.float64)) * u)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tail = np.floor(1.0 + np.log(v) / np.log(q))
    tail = np.where(np.isfinite(tail) & (tail >= 1.0), np.minimum(tail, _MAX_CLUSTER), 1.0)
    return np.where(v <= q * q, tail, np.where(v >= q, 1.0, 2.0)).astype(np.int32)


def _block_counts(
    model: _Model, labels: dict[str, np.ndarray], start: int, stop: int, seed: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR pieces (nnz per row, gene indices, counts) of cells ``start:stop``, from their own seed."""
    rng = np.random.default_rng(seed)
    G = model.n_vars
    phi = model.dispersion
    n = stop - start
    sub = labels["subtype"][start:stop].astype(np.intp)
    donor = labels["donor"][start:stop].astype(np.intp)
    pert = model.response_codes(labels["perturbation"][start:stop].astype(np.intp), donor)
    batch = model.batch_of_donor[donor]
    prof = sub * model.n_batches + batch

    library = model.mean_library_size * model.type_size[model.type_of_subtype[sub]] * model.batch_depth[batch]
    library *= np.exp(_LIBRARY_LOG_SD * rng.standard_normal(n) - _LIBRARY_LOG_SD**2 / 2)
    scale = library / model.norm[sub, donor]  # mu_cg = scale_c * w_sg * e_dg * f_pg

    # proposals: Poisson(nu_cg) per gene, nu_cg = scale_c * w_sg * env_bg >= mu_cg, i.e. a Poisson total
    # per cell and one alias draw per proposal; profile by profile, so each table row stays in cache
    key_dtype = np.uint32 if n * G < 2**32 else np.uint64
    cell_key = np.arange(n, dtype=key_dtype) * key_dtype(G)
    n_prop = rng.poisson(scale * model.proposal_total[prof])
    parts = []
    for p in np.unique(prof):
        cells = np.flatnonzero(prof == p)
        m = n_prop[cells]
        x = rng.random(int(m.sum()))
        x *= G
        j = x.astype(np.intp)
        np.minimum(j, G - 1, out=j)
        x -= j
        genes = np.where(x < model.prob[p].take(j), j, model.alias[p].take(j)).astype(key_dtype)
        del x, j
        genes += np.repeat(cell_key[cells], m)
        parts.append(genes)

    # genes a cell's perturbation up-regulates get Poisson(nu_cg * (f - 1)) more proposals
    if model.up_genes.size:
        pc = np.flatnonzero(pert)
        lo = model.up_ptr[pert[pc]]
        n_up = model.up_ptr[pert[pc] + 1] - lo
        cells_up = np.repeat(pc, n_up)
        pos = np.arange(int(n_up.sum())) + np.repeat(lo - (np.cumsum(n_up) - n_up), n_up)
        genes_up = model.up_genes[pos]
        rate = scale[cells_up] * model.proposal.take(prof[cells_up] * G + genes_up) * model.up_extra[pos]
        extra = rng.poisson(rate)
        hit = np.flatnonzero(extra)
        parts.append(np.repeat(cell_key[cells_up[hit]] + genes_up[hit].astype(key_dtype), extra[hit]))
    keys = np.concatenate(parts) if parts else np.zeros(0, key_dtype)
    del parts

    # unique (cell, gene) pairs, each with its number of proposals
    keys.sort()
    first = np.empty(keys.size, dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    del first
    n_proposals = np.diff(starts, append=keys.size).astype(np.int32)
    pair = keys[starts]
    del keys, starts
    bounds = np.append(np.searchsorted(pair, cell_key), pair.size)
    per_cell = np.diff(bounds)
    gene = pair.astype(np.intp)
    gene -= np.repeat(cell_key.astype(np.intp), per_cell)
    del pair

    # thin proposals to the Poisson(log1p(phi * mu) / phi) clusters of a negative binomial (float32)
    nu = model.proposal.take(np.repeat(prof * G, per_cell) + gene)
    nu *= np.repeat(scale.astype(np.float32), per_cell)
    mu = model.ratio.take(np.repeat(donor * G, per_cell) + gene)
    mu *= nu
    if model.target_keys.size:
        cand = np.flatnonzero(model.target_mask.take(gene) & np.repeat(pert > 0, per_cell))
        if cand.size:
            ck = np.repeat(pert, per_cell)[cand] * G + gene[cand]
            at = np.minimum(np.searchsorted(model.target_keys, ck), model.target_keys.size - 1)
            found = model.target_keys[at] == ck
            fold = model.target_fold[at[found]].astype(np.float32)
            cand = cand[found]
            mu[cand] *= fold
            nu[cand] *= np.maximum(fold, np.float32(1.0))
    if phi > 0:
        phimu = mu
        phimu *= np.float32(phi)
        accept = np.log1p(phimu)
        nu *= np.float32(phi)
    else:
        accept = mu
    accept /= nu
    del nu, mu

    # clusters: Binomial(proposals, accept) per pair; as one uniform when there is one proposal
    u = rng.random(accept.size)
    n_clusters = (u < accept).view(np.int8).astype(np.int32)
    multi = np.flatnonzero(n_proposals > 1)
    if multi.size:
        reps = n_proposals[multi]
        hits = rng.random(int(reps.sum()), dtype=np.float32) < np.repeat(accept[multi], reps)
        n_clusters[multi] = np.add.reduceat(hits, np.cumsum(reps) - reps, dtype=np.int32)
        del hits
    del n_proposals
    # cluster sizes ~ Logarithmic(phi * mu / (1 + phi * mu)): a Poisson number of them is NB(mu, phi)
    if phi > 0:
        u /= accept  # given a hit on a single proposal, u / accept is uniform again: Kemp's first uniform
        if multi.size:
            u[multi] = rng.random(multi.size)
        q = phimu / (np.float32(1.0) + phimu)
        counts = n_clusters.copy()
        first = np.flatnonzero((n_clusters > 0) & (u < q))
        counts[first] += _logseries_tail(rng, u[first], phimu[first]) - 1
        more = np.flatnonzero(n_clusters > 1)
        if more.size:
            reps = n_clusters[more] - 1
            idx = np.repeat(more, reps)
            v = rng.random(idx.size)
            extra = np.ones(idx.size, dtype=np.int32)
            tail = np.flatnonzero(v < q[idx])
            extra[tail] = _logseries_tail(rng, v[tail], phimu[idx[tail]])
            counts[more] += np.add.reduceat(extra, np.cumsum(reps) - reps, dtype=np.int32) - reps
        del q, u, phimu
    else:
        counts = n_clusters
    del accept
    kept = counts > 0
    csum = np.zeros(kept.size + 1, dtype=np.int64)
    np.cumsum(kept, out=csum[1:])
    row_nnz = csum[bounds[1:]] - csum[bounds[:-1]]
    keep = np.flatnonzero(kept)
    return row_nnz, gene[keep].astype(np.int32 if G < 2**31 else np.int64), counts[keep].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# blocks in order, optionally computed by threads (numpy releases the GIL in the heavy steps)


def _block_rows(mean_library_size: float) -> int:
    """Cells per seeded block: a power of two holding about ``_BLOCK_COUNTS`` expected counts."""
    rows = max(1.0, min(_MAX_BLOCK_ROWS, _BLOCK_COUNTS / mean_library_size))
    return 1 << int(np.log2(rows))


def _iter_blocks(
    model: _Model, labels: dict[str, np.ndarray], n_obs: int, block_rows: int, random_state: int, n_jobs: int
) -> Iterator[sp.csr_matrix]:
    """Consecutive seeded blocks of cells as CSR matrices (float32 counts)."""
    n_blocks = -(-n_obs // block_rows)

    def run(b: int) -> sp.csr_matrix:
        start, stop = b * block_rows, min(n_obs, (b + 1) * block_rows)
        row_nnz, indices, data = _block_counts(model, labels, start, stop, (random_state, _STREAM_BLOCKS, b))
        indptr = np.zeros(stop - start + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, model.n_vars))

    if n_jobs <= 1 or n_blocks <= 1:
        for b in range(n_blocks):
            yield run(b)
        return
    executor = ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="cellmint-synthetic")
    try:
        pending: deque = deque()
        submitted = 0
        while submitted < n_blocks or pending:
            while submitted < n_blocks and len(pending) < 2 * n_jobs:  # bounded look-ahead: bounded memory
                pending.append(executor.submit(run, submitted))
                submitted += 1
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
