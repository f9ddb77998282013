"""``cm.pp.select_hvgs``: scanpy's highly variable genes on data of any size, with scanpy's exact answers.

The statistics are gathered chunk by chunk (:mod:`._hvg_stats`); everything after them — the loess
fit, binning, normalisation, ranking and tie-breaking — follows ``scanpy.pp.highly_variable_genes``
step by step on per-gene vectors, so results match scanpy's for the same flavour.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import _logging as logg
from .._utils._chunks import RowChunk, open_matrix, open_root
from .._utils._docs import doc_params
from .._utils._panel import unique_gene_names
from .._utils._resources import ResourceMonitor
from .._utils._values import validate_chunk
from . import _hvg_dispersion, _hvg_pearson, _hvg_seurat_v3
from ._hvg_stats import arithmetic_for, clipped_sums, moments, scanpy_aggregates_batches

Flavor = Literal["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger", "pearson_residuals"]
_SEURAT_V3 = ("seurat_v3", "seurat_v3_paper")
_COUNT_FLAVORS = (*_SEURAT_V3, "pearson_residuals")
_FLAVORS = (*_SEURAT_V3, "seurat", "cell_ranger", "pearson_residuals")
_STAT_COLUMNS = (
    "means", "variances", "variances_norm", "residual_variances", "dispersions", "dispersions_norm", "gene_name",
    "mean_bin",
)  # fmt: skip
_CUTOFF_DEFAULTS = {"min_mean": 0.0125, "max_mean": 3.0, "min_disp": 0.5, "max_disp": np.inf}


@dataclass
class _Input:
    """What select_hvgs needs from any kind of input, without touching the matrix."""

    data: AnnData | Path  # handed to the chunk reader
    adata: AnnData | None  # where results can be written (None for a path)
    var_names: pd.Index
    obs: pd.DataFrame | None  # only the batch column is read for paths
    log1p_base: float | None


def _read_input(adata: AnnData | str | Path, batch_key: str | None) -> _Input:
    if isinstance(adata, AnnData):
        base = adata.uns.get("log1p", {}).get("base")
        return _Input(adata, adata, adata.var_names, adata.obs, base)
    if not isinstance(adata, str | Path):
        raise TypeError(f"`adata` must be an AnnData or a path to .h5ad/.zarr, not {type(adata).__name__}.")
    import anndata as ad

    path = Path(adata)
    with open_root(path) as root:
        return _input_from_root(root, path, batch_key, ad)


def _input_from_root(root, path: Path, batch_key: str | None, ad) -> _Input:
    var = ad.io.read_elem(root["var"])
    obs = None
    if batch_key is not None:
        if batch_key not in root["obs"]:
            columns = [k for k in root["obs"] if not k.startswith("__")]
            raise KeyError(f"batch_key {batch_key!r} is not a column of obs in {path}; columns: {columns}.")
        obs = pd.DataFrame({batch_key: ad.io.read_elem(root["obs"][batch_key])})
    base = None
    if "uns" in root and "log1p" in root["uns"] and "base" in root["uns"]["log1p"]:
        base = ad.io.read_elem(root["uns"]["log1p"]["base"])
    return _Input(path, None, var.index, obs, base)


def _batch_codes(inp: _Input, batch_key: str | None, flavor: str, layer: str | None) -> tuple[np.ndarray, list]:
    n_obs = _n_obs(inp, layer)
    if n_obs == 0:
        raise ValueError("adata has no cells: highly variable genes are undefined.")
    if batch_key is None:
        return np.zeros(n_obs, dtype=np.int64), [0]
    if inp.obs is None or batch_key not in inp.obs.columns:
        columns = [] if inp.obs is None else list(inp.obs.columns)
        raise KeyError(f"batch_key {batch_key!r} is not a column of obs; columns: {columns}.")
    values = inp.obs[batch_key]
    if not isinstance(values, pd.Series):  # lazily loaded obs (anndata.experimental.read_lazy): an xarray column
        values = pd.Series(np.asarray(values))
    if pd.isna(values).any():
        raise ValueError(f"obs[{batch_key!r}] has no batch for {int(pd.isna(values).sum())} cells; fill them in first.")
    if flavor in _COUNT_FLAVORS:
        # scanpy loops over np.unique(values): their sorted order decides how batches are averaged
        batches, codes = np.unique(np.asarray(values), return_inverse=True)
        return codes.astype(np.int64), list(batches)
    # scanpy makes the column categorical (sorted categories, as sanitize_anndata) and loops over them
    categorical = values if isinstance(values.dtype, pd.CategoricalDtype) else pd.Categorical(values)
    categorical = pd.Categorical(categorical).remove_unused_categories()
    return categorical.codes.astype(np.int64), list(categorical.categories)


def _n_obs(inp: _Input, layer: str | None) -> int:
    if inp.adata is not None:
        return inp.adata.n_obs
    with open_matrix(inp.data, layer=layer) as source:
        return source.shape[0]


def _value_check(flavor: str, layer: str | None, check_values: bool):
    where = "X" if layer is None else f"layers[{layer!r}]"
    require_counts = check_values and flavor in _COUNT_FLAVORS
    # negative values have no Pearson residual (and scanpy's sparse kernel would misread the values after one)
    require_nonnegative = flavor == "pearson_residuals"
    hint = (
        "Use a layer of counts (e.g. layer='counts'), pick flavor='seurat' for log-normalised data, or pass "
        "check_values=False to proceed anyway."
    )

    def check(chunk: RowChunk) -> None:
        validate_chunk(
            chunk,
            where=where,
            require_counts=require_counts,
            expectation=f"flavor={flavor!r} expects raw counts",
            hint=hint if require_counts else "Pearson residuals need counts, which are never negative.",
            require_nonnegative=require_nonnegative,
        )

    return check


def _check_arguments(flavor: str, n_top_genes: int | None, n_vars: int, cutoffs: dict, theta, clip) -> None:
    if flavor not in _FLAVORS:
        raise ValueError(f"flavor must be one of {list(_FLAVORS)}, not {flavor!r}.")
    if flavor == "pearson_residuals":
        if not theta > 0:  # scanpy's messages; NaN is refused too
            raise ValueError(f"Pearson residuals require theta > 0, not theta={theta!r} (np.inf: a Poisson model).")
        if clip is not None and not clip >= 0:
            raise ValueError(f"Pearson residuals require `clip>=0` or `clip=None`. Got clip={clip!r}.")
    if n_top_genes is None:
        if flavor in _COUNT_FLAVORS:
            raise ValueError(f"flavor={flavor!r} needs n_top_genes (cutoffs apply to 'seurat' and 'cell_ranger').")
        return
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, int | np.integer) or n_top_genes < 1:
        raise ValueError(f"n_top_genes must be a positive integer or None, not {n_top_genes!r}.")
    if n_top_genes > n_vars:
        raise ValueError(f"n_top_genes={n_top_genes} is larger than the {n_vars} genes available.")
    if flavor not in _COUNT_FLAVORS and cutoffs != _CUTOFF_DEFAULTS:
        warnings.warn("If you pass `n_top_genes`, all cutoffs are ignored.", UserWarning, stacklevel=3)


@doc_params(
    doc_flavor="""\
flavor
    ``"seurat_v3"`` / ``"seurat_v3_paper"``: normalised variance of raw counts after a loess fit of
    variance on mean (Stuart et al. 2019); they differ only with ``batch_key`` (ties broken by median
    rank vs. by number of batches). ``"seurat"`` (log-normalised data; Satija et al. 2015) and
    ``"cell_ranger"`` (normalised data; Zheng et al. 2017): dispersion normalised within bins of
    mean expression. ``"pearson_residuals"`` (raw counts; Lause et al. 2021, scanpy's
    ``sc.experimental.pp.highly_variable_genes``): variance of the clipped Pearson residuals of a
    negative-binomial offset model, which its authors recommend for UMI counts.""",
)
def select_hvgs(
    adata: AnnData | str | Path,
    *,
    n_top_genes: int | None = 2000,
    flavor: Flavor = "seurat_v3",
    batch_key: str | None = None,
    layer: str | None = None,
    chunk_size: int | None = None,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    span: float = 0.3,
    n_bins: int = 20,
    theta: float = 100,
    clip: float | None = None,
    check_values: bool = True,
    key_added: str = "highly_variable",
    subset: bool = False,
    inplace: bool = True,
    progress: bool | None = None,
) -> pd.DataFrame | AnnData | None:
    """Annotate highly variable genes, exactly as :func:`scanpy.pp.highly_variable_genes`, on data of any size.

    The matrix is read a chunk of cells at a time, so backed ``.h5ad`` files, ``.zarr`` stores and
    dask-backed AnnData larger than memory work; memory stays near one chunk plus a few vectors per
    gene and batch. For the same flavour and parameters the result equals that of the installed
    scanpy: the same genes, the same ranks and the same statistics, bit for bit (gene sums are added
    in scanpy's order and precision; scanpy >= 1.12's per-batch Welford moments are reproduced too).
    With dask, dask computes each block of cells (on a cluster if one is attached) and the blocks
    are summed in order. ``pearson_residuals`` reads the data three times (gene and cell totals, then
    the mean and the variance of the residuals, as scanpy's two loops), a fourth time only where
    scanpy's ``float32`` pairwise gene sums cannot be reproduced from exact totals (see
    ``check_values``). Unlike scanpy, duplicate gene names, NaN/inf values, non-counts for the
    count flavours (scanpy only warns), ``n_top_genes`` above the number of genes and, for
    ``pearson_residuals``, cells without counts (scanpy fails with ``ZeroDivisionError``) are errors,
    and duplicate entries of a sparse matrix are added up.

    Parameters
    ----------
    {doc_adata}
    n_top_genes
        Number of highly variable genes. With ``None`` (dispersion flavours only) genes are selected
        by the ``min_mean``/``max_mean``/``min_disp``/``max_disp`` cutoffs instead.
    {doc_flavor}
    batch_key
        ``obs`` column of batches: genes are ranked within each batch and combined as scanpy does,
        which avoids selecting batch-specific genes.
    {doc_layer}
    {doc_chunk_size}
    min_mean
        Lower cutoff on the mean (dispersion flavours with ``n_top_genes=None``).
    max_mean
        Upper cutoff on the mean (dispersion flavours with ``n_top_genes=None``).
    min_disp
        Lower cutoff on the normalised dispersion (dispersion flavours with ``n_top_genes=None``).
    max_disp
        Upper cutoff on the normalised dispersion (dispersion flavours with ``n_top_genes=None``).
    span
        Fraction of genes used by each local loess fit (``seurat_v3`` flavours).
    n_bins
        Number of equal-width mean bins (``"seurat"``); ``"cell_ranger"`` uses 5% percentile bins.
    theta
        Overdispersion of the negative binomial (``"pearson_residuals"``): the model's variance is
        ``mu + mu²/theta``; ``np.inf`` is a Poisson model.
    clip
        Residuals are clipped to ``[-clip, clip]`` (``"pearson_residuals"``); ``np.inf`` does not clip.
        ``None`` is scanpy's ``sqrt(n_cells)``; with ``batch_key``, scanpy takes the number of cells
        of the first batch (in sorted order) for every batch, and so does this function.
    check_values
        For the count flavours (``seurat_v3``, ``seurat_v3_paper``, ``pearson_residuals``), refuse
        negative or non-integer values (raw counts expected) where scanpy only warns; ``False``
        computes anyway. Negative values are always refused for ``pearson_residuals``, and NaN and
        infinite values for every flavour. With non-integer values ``pearson_residuals`` reads the
        data once more to add each gene's values in numpy's pairwise order, as scanpy does.
    key_added
        ``var`` column of the boolean mask; the rank, number of batches and intersection columns
        are ``f"{{key_added}}_rank"``, ``f"{{key_added}}_nbatches"`` and ``f"{{key_added}}_intersection"``.
    subset
        Keep only the highly variable genes. In memory, ``adata`` is subset in place (scanpy's
        behaviour). For backed ``adata`` nothing is loaded: the genes are marked in ``var`` and a
        backed view ``adata[:, mask]`` is returned. With ``inplace=False`` only the rows of the
        selected genes are returned.
    {doc_inplace} A path is opened read-only, so it needs ``inplace=False``.
    {doc_progress}

    Returns
    -------
    With ``inplace=False``: a :class:`pandas.DataFrame` (index: gene names) with scanpy's columns for
    the flavour. Otherwise ``None`` (a backed view with ``subset=True`` on backed data), and writes:

    ``adata.var[key_added]`` (bool)
        Whether the gene is highly variable.
    ``adata.var["means"]`` (float64)
        Mean per gene (``log1p`` of the mean of ``expm1`` for ``"seurat"``).
    ``adata.var["variances"]``, ``adata.var["variances_norm"]`` (float64)
        ``seurat_v3`` flavours: variance, and normalised variance averaged over batches.
    ``adata.var["variances"]``, ``adata.var["residual_variances"]`` (float64)
        ``pearson_residuals``: variance, and residual variance averaged over batches.
    ``adata.var[f"{{key_added}}_rank"]`` (float32)
        Count flavours: rank by normalised or residual variance (median over the batches where the
        gene is in the top; NaN outside the top).
    ``adata.var["dispersions"]`` (float64), ``adata.var["dispersions_norm"]`` (float32)
        Dispersion flavours: dispersion and normalised dispersion.
    ``adata.var[f"{{key_added}}_nbatches"]`` (int64)
        With ``batch_key``: in how many batches the gene is highly variable.
    ``adata.var[f"{{key_added}}_intersection"]`` (bool)
        With ``batch_key``, dispersion flavours and ``pearson_residuals``: in the top of every batch.
    ``adata.uns["hvg"]``
        ``{{"flavor": flavor}}``, as scanpy; ``pearson_residuals`` adds ``"computed_on"`` (the layer's
        name, or ``"adata.X"``).
    ``adata.uns["cellmint_resources"]["select_hvgs"]``
        What the run cost: ``wall_time_s``, ``n_cells``, ``cells_per_s``, ``peak_rss_bytes``,
        ``peak_rss_scope`` and ``device`` (also logged on the ``finished`` line).

    Examples
    --------
    >>> import cellmint as cm
    >>> adata = cm.datasets.cellbench()
    >>> cm.pp.select_hvgs(adata, n_top_genes=500, batch_key="technology")
    >>> int(adata.var["highly_variable"].sum())
    500
    """
    start = logg.info("extracting highly variable genes")
    monitor = ResourceMonitor().start()
    inp = _read_input(adata, batch_key)
    if inp.adata is None and inplace:
        raise ValueError(
            f"{inp.data} is opened read-only: pass inplace=False to get the table, or open it as a backed "
            "AnnData (anndata.read_h5ad(path, backed='r')) to annotate its var."
        )
    if inp.adata is not None and inplace and inp.adata.is_view and inp.adata.isbacked:
        raise ValueError(
            "adata is a view of a backed AnnData, whose var cannot be annotated in place: pass inplace=False, "
            "or call select_hvgs on the backed AnnData itself."
        )
    unique_gene_names(inp.var_names, where="var_names", consequence="statistics would be merged across different genes")
    if key_added in _STAT_COLUMNS:
        raise ValueError(f"key_added={key_added!r} would overwrite a statistics column; choose another name.")
    cutoffs = {"min_mean": min_mean, "max_mean": max_mean, "min_disp": min_disp, "max_disp": max_disp}
    _check_arguments(flavor, n_top_genes, len(inp.var_names), cutoffs, theta, clip)
    codes, batches = _batch_codes(inp, batch_key, flavor, layer)
    check = _value_check(flavor, layer, check_values)
    # scanpy >= 1.12 computes seurat_v3's per-batch moments with sc.get.aggregate (Welford), earlier ones from sums
    welford = flavor in _SEURAT_V3 and batch_key is not None and scanpy_aggregates_batches()
    arithmetic = arithmetic_for(inp.data, layer, welford_batches=welford)
    read = {"layer": layer, "chunk_size": chunk_size, "progress": progress}

    if flavor == "pearson_residuals":
        df = _hvg_pearson.table(inp.data, inp.var_names, codes, len(batches), arithmetic=arithmetic, check=check,
                                theta=theta, clip=clip, n_top_genes=n_top_genes, batched=batch_key is not None,
                                **read)  # fmt: skip
    elif flavor in _SEURAT_V3:
        stats = moments(inp.data, codes, len(batches), arithmetic=arithmetic, check=check, **read)
        clip = _hvg_seurat_v3.clip_values(stats, batches, span=span)
        clipped = clipped_sums(inp.data, codes, clip.values, **read)
        df = _hvg_seurat_v3.table(
            stats, clip, clipped, inp.var_names, flavor=flavor, n_top_genes=n_top_genes, batched=batch_key is not None
        )
    else:
        transform = _hvg_dispersion.expm1_transform(inp.log1p_base) if flavor == "seurat" else None
        stats = moments(inp.data, codes, len(batches), arithmetic=arithmetic, transform=transform, check=check, **read)
        df = _hvg_dispersion.table(
            stats,
            inp.var_names,
            batches=batches if batch_key is not None else None,
            flavor=flavor,
            n_bins=n_bins,
            n_top_genes=n_top_genes,
            cutoffs=cutoffs,
        )
    monitor.n_cells = int(inp.obs.shape[0]) if inp.obs is not None else None
    report = monitor.stop()
    logg.info(f"    finished: {report}", time=start)
    out = _deliver(
        inp, df, flavor=flavor, batch_key=batch_key, key_added=key_added, subset=subset, inplace=inplace, layer=layer
    )
    if inplace:  # beside scanpy's uns["hvg"], which stays as scanpy writes it
        inp.adata.uns.setdefault("cellmint_resources", {})["select_hvgs"] = report.to_dict()
    return out


def _renamed(df: pd.DataFrame, key_added: str) -> pd.DataFrame:
    if key_added == "highly_variable":
        return df
    return df.rename(
        columns=lambda c: key_added + c[len("highly_variable") :] if c.startswith("highly_variable") else c
    )


def _deliver(inp: _Input, df: pd.DataFrame, *, flavor, batch_key, key_added, subset, inplace, layer):
    df = _renamed(df, key_added)
    if not inplace:
        return df.loc[df[key_added]] if subset else df
    adata = inp.adata
    df = df.loc[adata.var_names]  # scanpy returns some tables sorted by gene name
    columns = [key_added, "means"]
    uns = {"flavor": flavor}
    if flavor == "pearson_residuals":  # scanpy's order of columns, the mask last
        columns = ["means", "variances", "residual_variances", f"{key_added}_rank"]
        if batch_key is not None:
            columns += [f"{key_added}_nbatches", f"{key_added}_intersection"]
        columns.append(key_added)
        uns["computed_on"] = layer if layer else "adata.X"
    elif flavor in _SEURAT_V3:
        columns = [key_added, f"{key_added}_rank", "means", "variances", "variances_norm"]
        if batch_key is not None:
            columns.append(f"{key_added}_nbatches")
    else:
        columns += ["dispersions", "dispersions_norm"]
        if batch_key is not None:
            columns += [f"{key_added}_nbatches", f"{key_added}_intersection"]
    for column in columns:
        values = df[column].to_numpy()
        if column == "dispersions_norm":
            values = values.astype(np.float32, copy=False)
        adata.var[column] = values
    adata.uns["hvg"] = uns
    logg.hint("added\n" + "\n".join(f"    {c!r}, (adata.var)" for c in columns))
    if not subset:
        return None
    mask = adata.var[key_added].to_numpy()
    if adata.isbacked:
        return adata[:, mask]
    adata._inplace_subset_var(mask)
    return None
