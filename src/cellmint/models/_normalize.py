"""The one normalisation of model inputs, shared by training and annotation, and input-kind detection.

A train/predict skew in normalisation silently ruins a classifier, so both sides call
:func:`normalize` with the recipe stored in the model's manifest:

- ``kind="counts"``: raw counts; ``transform="log1p"`` gives ``log1p(target_sum · x / library_size)``
  with the library size over **all** genes of the cell (not just the panel), ``"binary"`` gives
  ``x > 0``;
- ``kind="lognorm"``: values already log-normalised (what many shared h5ad files hold); used as
  they are (``"binary"``: ``x > 0``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

INPUT_KINDS = ("counts", "lognorm")
TRANSFORMS = ("log1p", "binary")


@dataclass(frozen=True)
class InputRecipe:
    """How raw model inputs become network inputs (stored in the model manifest)."""

    kind: str = "counts"
    transform: str = "log1p"
    target_sum: float = 1e4

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input must be one of {INPUT_KINDS} or 'auto', not {self.kind!r}.")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"input_transform must be one of {TRANSFORMS}, not {self.transform!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(X: torch.Tensor, library_size: torch.Tensor, recipe: InputRecipe) -> torch.Tensor:
    """Network input of a batch: ``X`` (cells × panel genes) as stored, ``library_size`` per cell (all genes)."""
    if recipe.transform == "binary":
        return (X > 0).to(X.dtype)
    if recipe.kind == "lognorm":
        return X
    scale = recipe.target_sum / library_size.clamp_min(1.0)
    return torch.log1p(X * scale.unsqueeze(1))
