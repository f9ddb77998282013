"""The seurat_v3 / seurat_v3_paper flavours (Stuart et al. 2019) from chunked gene statistics.

Per batch: a loess fit (scikit-misc, ``degree=2``) of log10 variance on log10 mean gives a regularised
standard deviation; values are clipped at ``mean + sqrt(n_cells) · reg_std`` and the variance of the
clipped, standardised values is the normalised variance. Genes are ranked within each batch and the
ranks combined as ``scanpy.pp.highly_variable_genes`` does (Seurat's ``SelectIntegrationFeatures``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._hvg_stats import Moments


@dataclass
class ClipValues:
    """Per-batch means, regularised standard deviations and clip values (batches × genes)."""

    means: np.ndarray
    reg_std: np.ndarray
    values: np.ndarray
    n_cells: np.ndarray


def clip_values(stats: Moments, batches: list, *, span: float) -> ClipValues:
    """Fit the mean–variance trend of every batch and derive the clip value of every gene."""
    from skmisc.loess import loess

    n_genes = stats.sums.shape[1]
    means, reg_std = np.zeros((len(batches), n_genes)), np.zeros((len(batches), n_genes))
    for b, batch in enumerate(batches):
        n = int(stats.n_cells[b])
        mean, var = stats.batch_mean_var(b) if len(batches) > 1 else stats.mean_var(b)
        not_const = var > 0
        if n < 2 or not_const.sum() < 3:
            raise ValueError(
                f"Batch {batch!r} has {n} cells and {int(not_const.sum())} genes that vary: too few for the "
                "loess fit of seurat_v3. Merge it with another batch or drop it."
            )
        estimated = np.zeros(n_genes, dtype=np.float64)
        model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
        try:
            model.fit()
        except ValueError as err:
            raise ValueError(
                f"The loess fit of seurat_v3 failed for batch {batch!r} ({n} cells, {int(not_const.sum())} varying "
                f"genes): {err}. Increase `span`, or merge small batches."
            ) from err
        estimated[not_const] = model.outputs.fitted_values
        means[b] = mean
        reg_std[b] = np.sqrt(10**estimated)
    n_cells = stats.n_cells[: len(batches)].astype(np.float64)
    return ClipValues(means, reg_std, reg_std * np.sqrt(n_cells)[:, None] + means, n_cells)


def table(
    stats: Moments,
    clip: ClipValues,
    clipped: tuple[np.ndarray, np.ndarray],
    var_names: pd.Index,
    *,
    flavor: str,
    n_top_genes: int,
    batched: bool,
) -> pd.DataFrame:
    """The seurat_v3 result table of scanpy, from the two chunked passes."""
    sums, squares = clipped
    norm_gene_vars = []
    for b in range(len(clip.n_cells)):
        n, mean, reg_std = clip.n_cells[b], clip.means[b], clip.reg_std[b]
        norm = (1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + squares[b] - 2 * sums[b] * mean)
        norm_gene_vars.append(norm.reshape(1, -1))
    norm_gene_vars = np.concatenate(norm_gene_vars, axis=0)
    # argsort twice gives ranks; rank 0 is the most variable gene of its batch
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
    n_batches_hvg = np.sum((ranked < n_top_genes).astype(int), axis=0)
    ranked[ranked >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)

    df = pd.DataFrame(index=var_names)
    df["means"], df["variances"] = stats.mean_var(-1)
    df["gene_name"] = df.index
    df["highly_variable_nbatches"] = n_batches_hvg
    df["highly_variable_rank"] = median_rank
    df["variances_norm"] = np.mean(norm_gene_vars, axis=0)
    if flavor == "seurat_v3":
        order, ascending = ["highly_variable_rank", "highly_variable_nbatches"], [True, False]
    else:  # seurat_v3_paper
        order, ascending = ["highly_variable_nbatches", "highly_variable_rank"], [False, True]
    ranked_genes = df[order].sort_values(order, ascending=ascending, na_position="last").index
    df["highly_variable"] = False
    df.loc[ranked_genes[: int(n_top_genes)], "highly_variable"] = True
    if not batched:
        df = df.drop(columns="highly_variable_nbatches")
    return df
