"""The dispersion flavours, ``seurat`` (Satija et al. 2015) and ``cell_ranger`` (Zheng et al. 2017).

Dispersion (variance / mean) is normalised within bins of mean expression: equal-width bins and
mean/sd for ``seurat`` (on ``expm1`` of log data, log of both), 5% percentile bins and median/MAD for
``cell_ranger``. With batches, every batch is scored on its expressed genes and the tables are
merged as ``scanpy.pp.highly_variable_genes`` does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

from .._utils import _logging as logg
from ._hvg_stats import Moments, scanpy_version

_MAD_SCALE = norm.ppf(0.75)  # MAD of a standard normal: consistent estimator of the sd


def expm1_transform(log1p_base: float | None):
    """Undo ``log1p`` on chunk values, in their own dtype (scanpy's ``x *= log(base); expm1(x)``)."""
    scale = None if log1p_base is None else np.log(log1p_base)

    def transform(values: np.ndarray) -> np.ndarray:
        if values.dtype.kind != "f":
            values = np.expm1(values if scale is None else values * scale)
        else:
            if scale is not None:
                values *= scale
            with np.errstate(over="ignore"):
                values = np.expm1(values, out=values)
        if not np.isfinite(values).all():
            raise ValueError(
                "flavor='seurat' expects log-normalised data (sc.pp.normalize_total, then sc.pp.log1p), but expm1 of "
                "some values overflows: these look like counts. Use flavor='seurat_v3' for counts."
            )
        return values

    return transform


def _mad(values: pd.Series) -> float:
    a = values.to_numpy()
    return float(np.median(np.abs(a - np.median(a)) / _MAD_SCALE))


def _in_bounds(mean, dispersion_norm, cutoffs: dict):
    return (
        (mean > cutoffs["min_mean"])
        & (mean < cutoffs["max_mean"])
        & (dispersion_norm > cutoffs["min_disp"])
        & (dispersion_norm < cutoffs["max_disp"])
    )


def _top_genes(dispersion_norm: np.ndarray, n_top_genes: int) -> np.ndarray:
    n_top_genes = min(n_top_genes, dispersion_norm.size)
    finite = dispersion_norm[~np.isnan(dispersion_norm)]
    if finite.size == 0:
        raise ValueError("no gene has a finite normalized dispersion (too few cells, or no gene varies)")
    if n_top_genes > finite.size:
        import warnings

        warnings.warn(
            "`n_top_genes` > number of normalized dispersions, returning all genes with normalized dispersions.",
            UserWarning,
            stacklevel=5,
        )
        n_top_genes = finite.size
    finite[::-1].sort()
    return np.nan_to_num(dispersion_norm, nan=-np.inf) >= finite[n_top_genes - 1]


def _score(mean, var, genes: pd.Index, *, flavor: str, n_bins: int, n_top_genes: int | None, cutoffs: dict):
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":  # log of both, as Seurat
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        bins = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(df["means"], np.arange(10, 105, 5)), np.inf]
    try:
        df["mean_bin"] = pd.cut(df["means"], bins=bins)
    except ValueError as err:  # percentile edges coincide when many genes share a mean (e.g. zero)
        raise ValueError(
            f"flavor={flavor!r} cannot bin genes by mean expression ({err.args[0].splitlines()[0]}): too many genes "
            "share the same mean, usually genes never detected. Filter them first, e.g. "
            "sc.pp.filter_genes(adata, min_cells=1)."
        ) from err
    if scanpy_version() >= (1, 12):  # scanpy 1.12 names the bins by their text (pandas 3 writes them so anyway)
        df["mean_bin"] = df["mean_bin"].cat.rename_categories(df["mean_bin"].cat.categories.astype("string"))
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        bin_stats = grouped.agg(avg="mean", dev="std")
        # a bin holding one gene has no sd: that gene's normalised dispersion is set to 1
        single = bin_stats["dev"].isnull()
        if single.any():
            logg.debug(f"{int(single.sum())} mean bins hold a single gene; their normalized dispersion is 1")
        bin_stats.loc[single, "dev"] = bin_stats.loc[single, "avg"]
        bin_stats.loc[single, "avg"] = 0
    else:
        bin_stats = grouped.agg(avg="median", dev=_mad)
    per_gene = bin_stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    disp_norm = df["dispersions_norm"].to_numpy()
    if n_top_genes is None:
        df["highly_variable"] = _in_bounds(mean, np.nan_to_num(disp_norm), cutoffs)
    else:
        if n_top_genes > len(genes):
            logg.info("`n_top_genes` > number of expressed genes in a batch, returning all of them.")
        df["highly_variable"] = _top_genes(disp_norm.copy(), n_top_genes)
    df.index = genes
    return df


def table(
    stats: Moments,
    var_names: pd.Index,
    *,
    batches: list | None,
    flavor: str,
    n_bins: int,
    n_top_genes: int | None,
    cutoffs: dict,
) -> pd.DataFrame:
    """The dispersion result table of scanpy (one batch, or merged over batches)."""
    score = {"flavor": flavor, "n_bins": n_bins, "n_top_genes": n_top_genes, "cutoffs": cutoffs}
    if batches is None:
        mean, var = stats.mean_var(0)
        return _score(mean, var, var_names, **score)

    n_batches = len(batches)
    tables = []
    for b, batch in enumerate(batches):
        mean, var = stats.mean_var(b)
        expressed = stats.n_detected[b] > 0  # scanpy drops genes without a detected cell in the batch
        try:
            df = _score(mean[expressed], var[expressed], var_names[expressed], **score).drop(columns="mean_bin")
        except ValueError as err:
            raise ValueError(f"Batch {batch!r} ({int(stats.n_cells[b])} cells): {err}") from err
        if not expressed.all():
            missing = pd.DataFrame(np.zeros((int((~expressed).sum()), df.shape[1])), columns=df.columns)
            missing["highly_variable"] = missing["highly_variable"].astype(bool)
            missing.index = var_names[~expressed]
            df = pd.concat([df, missing]).loc[var_names]
        tables.append(df)
    df = pd.concat(tables, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"}
    )
    df["highly_variable_nbatches"] = df["highly_variable"]
    df["highly_variable_intersection"] = df["highly_variable_nbatches"] == n_batches
    if n_top_genes is not None:
        # most often selected first, ties broken by the mean normalised dispersion (scanpy's order)
        df = df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last")
        df["highly_variable"] = np.arange(df.shape[0]) < n_top_genes
        df = df.loc[var_names]
    else:
        df["dispersions_norm"] = df["dispersions_norm"].fillna(0)
        df["highly_variable"] = _in_bounds(df["means"], df["dispersions_norm"], cutoffs)
    return df
