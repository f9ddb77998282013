"""``cm.datasets.synthetic``: seeded single-cell counts with cell types, subtypes, donors, batches, perturbations.

The model and its sampler live in :mod:`._synthetic_model`; the streamed ``.h5ad`` writer is the
shared one in :mod:`cellmint._utils._h5ad`.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils._h5ad import write_h5ad_streamed
from .._utils._progress import progress_bar
from .._utils._threads import default_threads
from ._synthetic_model import (
    _STREAM_CONTEXT,
    _STREAM_LABELS,
    _STREAM_MODEL,
    MODEL_VERSION,
    _block_rows,
    _build_model,
    _iter_blocks,
    _labels,
)

__all__ = ["synthetic"]


def _annotations(
    n_obs: int,
    n_vars: int,
    labels: dict[str, np.ndarray],
    extras: dict,
    *,
    n_cell_types: int,
    n_subtypes: int,
    n_donors: int,
    n_batches: int,
    n_perturbations: int,
    params: dict,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    type_names = [f"type_{t}" for t in range(n_cell_types)]
    sub_names = [f"type_{t}.sub_{j}" for t in range(n_cell_types) for j in range(n_subtypes)]
    donor_names = [f"donor_{d}" for d in range(n_donors)]
    batch_names = [f"batch_{b}" for b in range(n_batches)]
    batch_of_donor = np.arange(n_donors) % n_batches
    width = len(str(max(n_obs - 1, 0)))
    # object dtype throughout: pandas ≥ 3 would infer its string dtype, which anndata refuses to
    # write by default (allow_write_nullable_strings)
    type_names, sub_names, donor_names, batch_names = (
        pd.Index(names, dtype=object) for names in (type_names, sub_names, donor_names, batch_names)
    )
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(labels["cell_type"], categories=type_names),
            "cell_subtype": pd.Categorical.from_codes(labels["subtype"], categories=sub_names),
            "donor": pd.Categorical.from_codes(labels["donor"], categories=donor_names),
            "batch": pd.Categorical.from_codes(batch_of_donor[labels["donor"]], categories=batch_names),
        },
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_obs)], dtype=object),
    )
    pert_names = [f"pert_{p}" for p in range(n_perturbations)]
    if n_perturbations:
        obs["perturbation"] = pd.Categorical.from_codes(
            labels["perturbation"], categories=pd.Index(["control", *pert_names], dtype=object)
        )
    gene_names = np.array([f"gene_{g:0{max(5, len(str(n_vars - 1)))}d}" for g in range(n_vars)], dtype=object)
    var = pd.DataFrame(
        {"program": extras["program"], "program_log2fc": extras["program_log2fc"]},
        index=pd.Index(list(gene_names), dtype=object),
    )
    uns = dict(params)
    if n_perturbations:
        uns["perturbation_genes"] = {
            name: gene_names[g].astype(str) for name, g in zip(pert_names, extras["perturbation_genes"], strict=True)
        }
        uns["perturbation_log2fc"] = {
            name: lfc.astype(np.float32) for name, lfc in zip(pert_names, extras["perturbation_log2fc"], strict=True)
        }
    if "donor_state" in extras:
        uns["donor_state"] = pd.DataFrame(
            extras["donor_state"].astype(np.float32),
            index=pd.Index([f"donor_{d}" for d in range(n_donors)], dtype=object),
            columns=pd.Index([f"state_{k}" for k in range(extras["donor_state"].shape[1])], dtype=object),
        )
        uns["state_genes"] = {f"state_{k}": gene_names[g].astype(str) for k, g in enumerate(extras["state_genes"])}
        if n_perturbations:
            uns["perturbation_log2fc_by_donor"] = {
                name: lfc.astype(np.float32)
                for name, lfc in zip(pert_names, extras["perturbation_log2fc_by_donor"], strict=True)
            }
    return obs, var, uns


# public API


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def _check_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be a finite number {'> 0' if positive else '>= 0'}, got {value}.")
    return value


def synthetic(
    n_obs: int = 2000,
    n_vars: int = 2000,
    *,
    n_cell_types: int = 5,
    n_subtypes: int = 3,
    n_donors: int = 4,
    n_batches: int = 2,
    n_perturbations: int = 0,
    perturbation_effect: float = 1.0,
    perturbation_fraction: float | None = None,
    context_response: float = 0.0,
    mean_library_size: float = 2000.0,
    dispersion: float = 0.5,
    donor_effect: float = 0.15,
    batch_effect: float = 0.25,
    path: str | os.PathLike | None = None,
    overwrite: bool = False,
    chunk_size: int = 10_000,
    compression: str | None = None,
    n_jobs: int | None = None,
    random_state: int = 0,
    progress: bool | None = None,
) -> ad.AnnData:
    """Realistic, seeded single-cell counts (negative binomial), in memory or streamed to ``.h5ad``.

    Cells belong to a two-level hierarchy of cell types and subtypes, come from donors processed in
    batches, and optionally carry a genetic perturbation. Counts are exact negative-binomial draws
    around a per-cell mean built from those factors, so they look like droplet UMI counts: sparse,
    heavy-tailed across genes, overdispersed within a cell type. The work grows with the number of
    counts (``n_obs × mean_library_size``), not with ``n_obs × n_vars``, and a file is written a
    chunk at a time: a million cells × 20,000 genes stream to disk in bounded memory.

    The model, for cell *c* of subtype *s* (of cell type *t*), donor *d* (in batch *b*) and
    perturbation *p*, and gene *g*:

    - baseline abundances are log-normal (sd 2.2 on the natural-log scale), so a few genes take a
      large share of the counts and most are rarely seen; the 5% most abundant are housekeeping
      genes, alike in all cells;
    - each cell type up-regulates its own program of ~2% of the genes 3-8 fold, and each subtype a
      further, smaller program (a quarter of that size) 2-4 fold; programs are disjoint, leave out
      the housekeeping genes and favour expressed genes;
    - donors and batches multiply every gene by log-normal factors (``donor_effect``,
      ``batch_effect``: sd of the natural log); donors are *nested* in batches (donor *i* is in
      batch ``i % n_batches``), as when each donor's sample is processed in one batch;
    - a perturbation moves its own set of ~0.5% of the genes (``perturbation_fraction``; at least 5) up
      or down (half each);
      the absolute log2 fold change is ``perturbation_effect`` times a per-perturbation strength
      (0.5-1.5) times a per-gene log-normal factor (sd 0.3);
    - with ``context_response > 0`` the donors are *contexts* whose responses differ in a shared way:
      each donor has a latent state (2 standard normal numbers) that its cells show on two state
      programs of ~1% of the genes each (``2 ** state`` fold), and every perturbation's response
      depends on it: its own genes' log2 fold changes are scaled by ``2 ** (context_response · a·state)``,
      and as many *conditional* genes move by ``context_response · perturbation_effect · u · (b·state)``
      (up in some donors, down in others), with per-perturbation directions ``a``, ``b`` and per-gene
      ``u`` (log-normal size, random sign). The truth is in ``uns["synthetic"]``;
    - the library size ``L_c`` is log-normal around ``mean_library_size`` (sd 0.4 of the log), scaled
      by a cell-type factor (RNA content) and a batch factor (sequencing depth);
    - ``mu_cg = L_c * w_cg * f_pg / sum_g' w_cg'`` with ``w_cg`` the product of the baseline, program,
      donor and batch factors and ``f_pg`` the perturbation's fold change (1 off its genes): a
      perturbation moves the counts of its own genes only, and the library size with them;
    - the count is negative binomial: mean ``mu_cg``, variance ``mu_cg + dispersion * mu_cg**2``,
      drawn independently for every cell and gene given ``L_c`` (``dispersion=0`` gives Poisson).

    Cell types, subtypes and donors have unequal sizes (Dirichlet proportions) and the mix of cell
    types varies between donors; cells are in random order. When ``n_perturbations > 0``, about half
    of the cells are ``"control"`` and the rest are spread evenly over the perturbations.

    Randomness comes only from local generators seeded by ``random_state``: one stream for the model
    parameters, one for the labels and one per fixed block of cells (``(random_state, block)``).
    The same arguments give the same matrix, whatever ``chunk_size``, ``n_jobs`` and ``path``.

    Parameters
    ----------
    n_obs
        Number of cells.
    n_vars
        Number of genes.
    n_cell_types
        Number of coarse cell types (``obs["cell_type"]``).
    n_subtypes
        Subtypes per cell type (``obs["cell_subtype"]``); every subtype belongs to one cell type.
    n_donors
        Number of donors; at least ``n_batches`` (donors are nested in batches).
    n_batches
        Number of batches.
    n_perturbations
        Number of perturbations besides ``"control"``; 0 (the default) writes no
        ``obs["perturbation"]`` column.
    perturbation_effect
        Typical absolute log2 fold change a perturbation applies to its genes; 0 for no effect.
    perturbation_fraction
        Share of the genes each perturbation moves; ``None``: 0.5% (at least 5 genes). Strong drugs
        and knock-outs of regulators move hundreds of genes (then top-100 DE metrics measure real
        responses, not noise).
    context_response
        How much perturbation responses differ between donors, through each donor's latent state
        (see above); 0 (the default) gives every donor the same response and draws no state, so
        the counts are those of earlier versions. With many donors (say ``n_donors=24``) this is a
        screen with many contexts whose responses share structure, to test whether a model learns
        how a response depends on its context.
    mean_library_size
        Mean expected number of counts (UMIs) per cell.
    dispersion
        Negative-binomial dispersion ``phi`` (variance ``mu + phi * mu**2``; ``1 / phi`` is the
        "size" or ``theta`` of other parameterisations). The default 0.5 is a moderate
        overdispersion for cells of one subtype; 0 gives Poisson counts.
    donor_effect
        Sd of the natural log of the per-donor, per-gene expression factors.
    batch_effect
        Sd of the natural log of the per-batch, per-gene expression factors.
    path
        ``None`` to return the data in memory. A path ending in ``.h5ad`` to stream the matrix to
        that file, a chunk at a time, and return it opened ``backed="r"``. The file is written under
        a temporary name in the same folder and renamed when complete, so an interrupted run never
        leaves a partial file at ``path``.
    overwrite
        Replace an existing file at ``path`` (otherwise :class:`FileExistsError`).
    chunk_size
        Cells buffered before each write to the file (at least one block of cells, see
        ``uns["synthetic"]["block_size"]``); peak memory grows with it. Ignored in memory. The counts
        do not depend on it.
    compression
        HDF5 compression of ``X`` in the file: ``None`` (fastest, the default), ``"gzip"`` or ``"lzf"``.
    n_jobs
        Threads drawing blocks of cells; ``None``: ``sc.settings.n_jobs`` when set (``-1``: every core),
        else up to 4, as many as there are CPU cores. The counts do not depend on it.
    random_state
        Seed (a non-negative integer) of the local random number generators; recorded in ``uns``.
    progress
        Progress bar over cells (``None``: only when someone watches, see
        :func:`cellmint._utils._progress.show_progress`).

    Returns
    -------
    An :class:`~anndata.AnnData` (in memory, or backed when ``path`` is given) with

    ``X``
        Counts as ``float32`` integers, :class:`scipy.sparse.csr_matrix` (in memory) or a CSR group
        in the file (``data`` float32, ``indices`` int32, ``indptr`` int64).
    ``obs_names``, ``var_names``
        ``"cell_0000"…`` and ``"gene_00000"…``, zero-padded.
    ``obs["cell_type"]``
        Categorical: ``"type_0"``, ``"type_1"``, ….
    ``obs["cell_subtype"]``
        Categorical: ``"type_0.sub_0"``, …; the part before the dot is the cell's ``cell_type``.
    ``obs["donor"]``, ``obs["batch"]``
        Categorical: ``"donor_0"``…, ``"batch_0"``…; ``donor_i`` is always in ``batch_{i % n_batches}``.
    ``obs["perturbation"]``
        Only when ``n_perturbations > 0``. Categorical: ``"control"``, ``"pert_0"``, ….
    ``var["program"]``
        Categorical: the program a gene belongs to, ``"type_k"`` or ``"type_k.sub_j"``, else
        ``"housekeeping"`` (the 5% most abundant genes at baseline) or ``"none"``.
    ``var["program_log2fc"]``
        Log2 fold change of the gene in its program's cells (0 outside programs).
    ``uns["synthetic"]``
        The arguments (``n_obs``, ``n_vars``, ``n_cell_types``, ``n_subtypes``, ``n_donors``,
        ``n_batches``, ``n_perturbations``, ``perturbation_effect``, ``mean_library_size``,
        ``dispersion``, ``donor_effect``, ``batch_effect``, ``random_state``), ``model_version``
        and ``block_size`` (cells per seeded block). With perturbations also
        ``perturbation_genes`` and ``perturbation_log2fc``: dicts from perturbation name to the names
        of the genes it moves and their log2 fold changes (and ``perturbation_fraction`` when given).
        With ``context_response > 0`` also
        ``context_response``, ``donor_state`` (DataFrame donors × ``state_0``, ``state_1``),
        ``state_genes`` (dict: state → gene names) and ``perturbation_log2fc_by_donor`` (dict:
        perturbation → array donors × its genes, the true log2 fold changes in each donor); then
        ``perturbation_genes`` includes the conditional genes, whose ``perturbation_log2fc`` (the
        response at state 0) is 0.

    Notes
    -----
    How the counts are drawn, exactly and without visiting every cell × gene entry: a cell's
    proposals are a Poisson stream over genes, drawn from its (subtype, batch) profile with Walker
    alias tables, at a rate ``nu_cg >= mu_cg`` (an envelope over the batch's donors and the
    perturbation's up-regulated genes). Proposals are sorted into (cell, gene) pairs and thinned to
    a Poisson number of clusters, mean ``log1p(dispersion * mu_cg) / dispersion``; each cluster holds
    a Logarithmic(``dispersion * mu_cg / (1 + dispersion * mu_cg)``) number of counts. A Poisson sum
    of logarithmic variables is negative binomial (Quenouille, 1949), so every count is NB(``mu_cg``,
    ``dispersion``). Cells are drawn in blocks of ``uns["synthetic"]["block_size"]`` (1024 for
    libraries up to 2048 counts), on ``n_jobs`` threads.

    Speed and memory: about 65 s, 0.8 GB peak RSS and an 8 GB file for 10⁶ cells × 20,000 genes at
    the default library size on 2 cores (``benchmarks/synthetic.py``). Each thread needs about
    35 bytes per count of a block (~70 MB); the model holds ~12 bytes ×
    ``n_cell_types × n_subtypes × n_batches × n_vars``.

    Examples
    --------
    >>> import cellmint as cm
    >>> adata = cm.datasets.synthetic(500, 300, n_perturbations=2, random_state=1)
    >>> adata.shape
    (500, 300)
    >>> sorted(adata.obs.columns)
    ['batch', 'cell_subtype', 'cell_type', 'donor', 'perturbation']
    >>> bool((adata.X.data == adata.X.data.round()).all())
    True

    Stream an atlas-sized matrix to disk in bounded memory and open it backed::

        adata = cm.datasets.synthetic(1_000_000, 20_000, path="atlas.h5ad")
    """
    n_obs = _check_int("n_obs", n_obs, 1)
    n_vars = _check_int("n_vars", n_vars, 1)
    n_cell_types = _check_int("n_cell_types", n_cell_types, 1)
    n_subtypes = _check_int("n_subtypes", n_subtypes, 1)
    n_donors = _check_int("n_donors", n_donors, 1)
    n_batches = _check_int("n_batches", n_batches, 1)
    n_perturbations = _check_int("n_perturbations", n_perturbations, 0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    random_state = _check_int("random_state", random_state, 0)
    if n_donors < n_batches:
        raise ValueError(
            f"`n_donors` ({n_donors}) must be >= `n_batches` ({n_batches}): donors are nested in "
            "batches and every batch needs a donor."
        )
    perturbation_effect = _check_float("perturbation_effect", perturbation_effect)
    context_response = _check_float("context_response", context_response)
    if perturbation_fraction is not None:
        perturbation_fraction = _check_float("perturbation_fraction", perturbation_fraction)
        if not 0 < perturbation_fraction <= 1:
            raise ValueError(f"`perturbation_fraction` must be in (0, 1], got {perturbation_fraction}.")
    mean_library_size = _check_float("mean_library_size", mean_library_size, positive=True)
    dispersion = _check_float("dispersion", dispersion)
    donor_effect = _check_float("donor_effect", donor_effect)
    batch_effect = _check_float("batch_effect", batch_effect)
    if compression not in (None, "gzip", "lzf"):
        raise ValueError(f"`compression` must be None, 'gzip' or 'lzf', got {compression!r}.")
    if n_jobs is None:
        n_jobs = default_threads()
    n_jobs = _check_int("n_jobs", n_jobs, 1)
    target = None
    if path is not None:
        target = Path(path)
        if target.suffix != ".h5ad":
            raise ValueError(f"`path` must end in '.h5ad', got {str(path)!r}.")
        if target.exists() and not overwrite:
            raise FileExistsError(f"`path` {str(target)!r} exists; pass overwrite=True to replace it.")
        if not target.parent.is_dir():
            raise FileNotFoundError(f"The folder of `path` does not exist: {str(target.parent)!r}.")

    model, extras = _build_model(
        np.random.default_rng([random_state, _STREAM_MODEL]),
        n_vars=n_vars,
        n_cell_types=n_cell_types,
        n_subtypes=n_subtypes,
        n_donors=n_donors,
        n_batches=n_batches,
        n_perturbations=n_perturbations,
        perturbation_effect=perturbation_effect,
        mean_library_size=mean_library_size,
        dispersion=dispersion,
        donor_effect=donor_effect,
        batch_effect=batch_effect,
        context_response=context_response,
        context_rng=np.random.default_rng([random_state, _STREAM_CONTEXT]) if context_response > 0 else None,
        **({} if perturbation_fraction is None else {"perturbation_fraction": perturbation_fraction}),
    )
    labels = _labels(
        np.random.default_rng([random_state, _STREAM_LABELS]),
        n_obs,
        n_cell_types=n_cell_types,
        n_subtypes=n_subtypes,
        n_donors=n_donors,
        n_perturbations=n_perturbations,
    )
    block_rows = _block_rows(mean_library_size)
    params = {
        "model_version": MODEL_VERSION,
        "n_obs": n_obs,
        "n_vars": n_vars,
        "n_cell_types": n_cell_types,
        "n_subtypes": n_subtypes,
        "n_donors": n_donors,
        "n_batches": n_batches,
        "n_perturbations": n_perturbations,
        "perturbation_effect": perturbation_effect,
        "mean_library_size": mean_library_size,
        "dispersion": dispersion,
        "donor_effect": donor_effect,
        "batch_effect": batch_effect,
        "random_state": random_state,
        "block_size": block_rows,
    }
    if context_response > 0:  # recorded only when used: earlier arguments give the same uns as before
        params["context_response"] = context_response
    if perturbation_fraction is not None:
        params["perturbation_fraction"] = perturbation_fraction
    obs, var, uns = _annotations(
        n_obs,
        n_vars,
        labels,
        extras,
        n_cell_types=n_cell_types,
        n_subtypes=n_subtypes,
        n_donors=n_donors,
        n_batches=n_batches,
        n_perturbations=n_perturbations,
        params=params,
    )
    blocks = _iter_blocks(model, labels, n_obs, block_rows, random_state, n_jobs)
    with progress_bar(total=n_obs, desc="synthetic", unit="cells", progress=progress) as bar:
        counted = _count_rows(blocks, bar)
        try:
            if target is None:
                X = sp.vstack(list(counted), format="csr") if n_obs else sp.csr_matrix((0, n_vars), dtype=np.float32)
            else:
                write_h5ad_streamed(
                    target,
                    counted,
                    obs=obs,
                    var=var,
                    uns={"synthetic": uns},
                    buffer_rows=chunk_size,
                    compression=compression,
                )
        finally:
            blocks.close()
    if target is None:
        return ad.AnnData(X=X, obs=obs, var=var, uns={"synthetic": uns})
    return ad.read_h5ad(target, backed="r")


def _count_rows(blocks, bar):
    for block in blocks:
        yield block
        bar.update(block.shape[0])
