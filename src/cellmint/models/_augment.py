"""Count-space augmentation of training batches: what differs between a reference and a query.

Each transform mimics a real difference between datasets, and each draws from the training run's
``torch.Generator`` (seeded by ``random_state``):

- **binomial thinning** (sequencing depth): every count of a cell is kept with probability ``p``,
  ``p`` drawn per cell from ``thinning=(low, high)``; the library size is scaled by ``p`` too;
- **gene dropout** (genes the query did not measure): a fraction drawn per batch from
  ``gene_dropout=(low, high)`` of the panel's genes is zeroed in every cell of the batch. A range
  starting at 0 includes batches with every gene;
- **count masking** (technical dropouts): each non-zero value is zeroed with probability ``masking``;
- **Poisson noise** (sampling noise): counts are resampled from a Poisson of their value, in a
  fraction ``poisson`` of cells;
- **gene scaling** (another technology or chemistry): every gene's values in a batch are multiplied
  by a factor ``exp(gene_scale · z)``, ``z`` standard normal per gene and batch, and the library
  sizes follow. Technologies capture genes with different efficiencies: the same cell lines measured
  with CEL-seq2 and Drop-seq differ by a factor of ``exp(0.5)`` per gene (standard deviation of the
  log ratio of mean expression, CellBench), with 10x by ``exp(0.7–0.9)``; within one technology, by
  ``exp(0.1)``.

Thinning, Poisson noise and gene scaling need counts; on log-normalised inputs used as they are,
only dropout and masking apply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba
import numpy as np
import torch


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings (stored in the model manifest); :data:`DEFAULT` and ``NONE`` are the presets."""

    # defaults from benchmarks/annotator.py --ablation (docs/annotator.md): stronger settings cost
    # macro-F1 on the real tasks, none at all gives no robustness to depth or missing genes
    thinning: tuple[float, float] | None = (0.5, 1.0)
    gene_dropout: tuple[float, float] | None = (0.0, 0.15)
    masking: float = 0.0
    poisson: float = 0.0
    gene_scale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("thinning", "gene_dropout"):
            bounds = getattr(self, name)
            if bounds is not None and not (len(bounds) == 2 and 0 <= bounds[0] <= bounds[1] <= 1):
                raise ValueError(f"augment {name} must be None or (low, high) with 0 ≤ low ≤ high ≤ 1, not {bounds!r}.")
        for name in ("masking", "poisson"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment {name} must be in [0, 1), not {getattr(self, name)!r}.")
        if not 0 <= self.gene_scale <= 3:
            raise ValueError(
                f"augment gene_scale must be in [0, 3] (a log-scale standard deviation), not {self.gene_scale!r}."
            )
        if self.thinning is not None and self.thinning[0] == 0:
            raise ValueError("augment thinning must keep some counts: its low end must be above 0.")

    @classmethod
    def from_arg(cls, augment: bool | dict | Augmentation | None) -> Augmentation:
        """``True``/``None`` → defaults, ``False`` → none, a dict → defaults updated with it."""
        if isinstance(augment, Augmentation):
            return augment
        if augment is None or augment is True:
            return cls()
        if augment is False:
            return cls(thinning=None, gene_dropout=None, masking=0.0, poisson=0.0, gene_scale=0.0)
        if isinstance(augment, dict):
            unknown = set(augment) - set(cls.__dataclass_fields__)
            if unknown:
                known = list(cls.__dataclass_fields__)
                raise ValueError(f"Unknown augment settings {sorted(unknown)}; known: {known}.")
            return cls(**{**asdict(cls()), **augment})
        raise TypeError(f"augment must be True, False, a dict or an Augmentation, not {type(augment).__name__}.")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _uniform(low: float, high: float, size: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


@numba.njit(nogil=True, cache=True)
def _augment_counts(X, keep, noisy, dropped, masking, factor, rng, counts, shift):
    """One pass over the stored values of a dense batch, in place: thin, resample, drop genes, mask, scale.

    ``shift[i]`` receives what scaling added to cell ``i``'s total (its library size follows).
    """
    n_cells, n_genes = X.shape
    for i in range(n_cells):
        for j in range(n_genes):
            v = X[i, j]
            if v == 0:
                continue
            if dropped[j]:
                X[i, j] = 0
                continue
            if counts:
                if keep[i] < 1:
                    v = rng.binomial(int(v), keep[i])
                if noisy[i] and v > 0:
                    v = rng.poisson(v)
            if masking > 0 and rng.random() < masking:
                v = 0
            if counts and v > 0 and factor[j] != 1.0:
                shift[i] += v * (factor[j] - 1.0)
                v = v * factor[j]
            X[i, j] = v


def augment_batch(
    X: torch.Tensor, library_size: torch.Tensor, settings: Augmentation, *, counts: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented copy of a dense CPU batch (cells × genes) and its library sizes (see module docstring).

    The per-cell and per-batch choices are drawn from ``generator``; the per-value draws by a compiled
    pass over the stored values only, seeded from ``generator`` too.
    """
    n_cells, n_genes = X.shape
    keep = torch.ones(n_cells, dtype=torch.float64)
    if counts and settings.thinning is not None and settings.thinning[0] < 1:
        keep = _uniform(*settings.thinning, n_cells, generator).double()
    noisy = torch.zeros(n_cells, dtype=torch.bool)
    if counts and settings.poisson > 0:
        noisy = torch.rand(n_cells, generator=generator) < settings.poisson
    dropped = torch.zeros(n_genes, dtype=torch.bool)
    if settings.gene_dropout is not None and settings.gene_dropout[1] > 0:
        fraction = float(_uniform(*settings.gene_dropout, 1, generator))
        dropped = torch.rand(n_genes, generator=generator) < fraction
    factor = torch.ones(n_genes, dtype=torch.float64)
    if counts and settings.gene_scale > 0:
        factor = torch.exp(settings.gene_scale * torch.randn(n_genes, generator=generator, dtype=torch.float64))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    out = X.detach().to("cpu", torch.float32, copy=True).contiguous()
    rng = np.random.default_rng(seed)  # per-value draws, seeded from the run's torch generator
    shift = np.zeros(n_cells)
    _augment_counts(out.numpy(), keep.numpy(), noisy.numpy(), dropped.numpy(), float(settings.masking),
                    factor.numpy(), rng, counts, shift)  # fmt: skip
    library = library_size * keep.to(library_size.dtype)
    if counts and settings.gene_scale > 0:
        library = (library + torch.as_tensor(shift, dtype=library.dtype)).clamp_min(1.0)
    return out, library
