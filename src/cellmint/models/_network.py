"""The annotator network: one shared encoder, one classification head per label level.

``genes → [Linear → LayerNorm → ReLU → Dropout] × len(hidden) → latent`` and, per level,
``latent → Linear → logits``; optional regression heads map the latent to reference embeddings
(e.g. ``X_umap``) for projecting queries. The latent (last hidden layer) is what annotation uses
for nearest-neighbour refinement and open-set distances.
"""

from __future__ import annotations

import torch
from torch import nn


class AnnotatorNet(nn.Module):
    """Shared encoder + per-level heads (+ optional embedding regressors)."""

    def __init__(self, n_genes: int, n_classes: dict[str, int], *, hidden: tuple[int, ...] = (512, 256),
                 dropout: float = 0.2, embeddings: dict[str, int] | None = None, linear: bool = False):  # fmt: skip
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one layer size.")
        layers: list[nn.Module] = []
        width = n_genes
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({level: nn.Linear(width, n) for level, n in n_classes.items()})
        # optional "wide" path: a linear model of the inputs added to each level's logits
        self.linear = nn.ModuleDict({level: nn.Linear(n_genes, n, bias=False) for level, n in n_classes.items()}
                                    if linear else {})  # fmt: skip
        self.regressors = nn.ModuleDict({name: nn.Linear(width, dim) for name, dim in (embeddings or {}).items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(latent, logits per level, embedding per regressor)``."""
        latent = self.encoder(x)
        logits = {level: head(latent) for level, head in self.heads.items()}
        for level, wide in self.linear.items():
            logits[level] = logits[level] + wide(x)
        embedded = {name: reg(latent) for name, reg in self.regressors.items()}
        return latent, logits, embedded
