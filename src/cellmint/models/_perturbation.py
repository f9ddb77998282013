"""``cm.PerturbationModel``: a set model of perturbation responses, and everything needed to apply it.

The network (:class:`PerturbationNet`) takes a *set* of control cells of one context (a patient, a
cell line, a replicate) and a perturbation, lets the cells attend to each other, and returns one
predicted perturbed cell per control cell::

    prediction = control cell + average effect of the perturbation in training, at the cell's
                 quantile of the gene + learned residual

The average effect at a quantile is fixed (``binned_effect``): in each training context the control
and perturbed cells of a gene are sorted and cut into ``effect_bins`` equal shares, and the effect of
a share is the difference of their means, averaged over the contexts. A cell in the lowest fifth of a
gene's values within its set thus moves like the lowest fifth of the training cells, so the predicted
set's spread follows the training responses, and the effects average to the "perturbation mean"
baseline's (with one bin they are that baseline). The residual's last layer starts at zero, so an
untrained network *is* this binned baseline; training with a distributional
loss (energy distance between predicted and real sets, plus a term on their means) teaches it how
the response depends on the context and on each cell. Values are log-normalised expression over
the model's gene panel, or an embedding (``use_rep``) decoded back to genes by a ridge map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._artifact import h5ad_safe, read_artifact, write_artifact
from ._normalize import InputRecipe

KIND = "cellmint.PerturbationModel"
#: 1: manifest + weights.pt (network, average effects, optional decoder); 2: the manifest carries its own
#: checksum (``_artifact``); 3: several networks (``nets.{i}.*``, averaged) and the stack (``stack.*``:
#: weights, training pseudobulks); 4: the stack has a sixth component, ``pls`` (a reader of format 3 would
#: predict without its weight, so it must refuse these folders). Versions 1 and 2 (one network, keys
#: unprefixed) and 3 (a stack of the network and the four baselines) are still read.
FORMAT_VERSION = 4


class PerturbationNet(nn.Module):
    """Control set (batch × cells × features) + perturbation index (batch) → predicted set, same shape.

    Two parts predict the residual around ``control + average effect``:

    - per value (cell, gene): a small network shared by all genes reads the cell's value, the set's
      mean of that gene, the gene's and the perturbation's embeddings, the cell's context vector
      and (``effect_input``) the average effect it starts from, so a response can depend on how much
      of the gene the cell and its context express, and be scaled up or down by the context;
    - per cell: the context vector comes from the cells attending to each other (a transformer over
      the set, the perturbation embedding added to every cell).
    """

    def __init__(self, n_features: int, n_perturbations: int, *, hidden: int = 128, n_layers: int = 2,
                 n_heads: int = 4, dropout: float = 0.1, gene_dim: int = 8, effect_bins: int = 1,
                 effect_input: bool = False):  # fmt: skip
        super().__init__()
        self.effect_input = effect_input
        self.encoder = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.perturbation = nn.Embedding(n_perturbations, hidden)
        layer = nn.TransformerEncoderLayer(hidden, n_heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.attention = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.context = nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, gene_dim))
        self.gene = nn.Parameter(torch.randn(n_features, gene_dim) * 0.1)
        self.perturbation_gene = nn.Embedding(n_perturbations, gene_dim)
        n_inputs = 2 + 3 * gene_dim + int(effect_input)
        self.value = nn.Sequential(nn.Linear(n_inputs, 2 * gene_dim), nn.GELU(), nn.Linear(2 * gene_dim, 1))
        nn.init.zeros_(self.value[-1].weight)  # untrained = control + average effect
        nn.init.zeros_(self.value[-1].bias)
        self.register_buffer("binned_effect", torch.zeros(n_perturbations, effect_bins, n_features))
        self.register_buffer("control_mean", torch.zeros(n_perturbations, n_features))
        self.contrast = nn.Parameter(torch.zeros(n_perturbations))  # λ − 1 of the context adjustment

    def anchor(self, controls: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """Binned average effect, adjusted for how the set's mean differs from the training contexts' control mean.

        ``effect_p(bin of the cell's value) + (λ_p − 1) · (set mean − control mean_p)`` per cell and
        gene; a value's bin is its rank among the set's values of that gene (ties in set order, which
        is random). λ = 1 (the start) shifts every context alike; λ < 1 pulls perturbed contexts
        towards a shared perturbed state, as many drugs do.
        """
        batch, cells, genes = controls.shape
        effect = self.binned_effect[perturbation]  # batch × bins × genes
        bins = effect.shape[1]
        if bins == 1:
            per_value = effect.expand(batch, cells, genes)
        else:
            order = controls.argsort(dim=1, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=controls.device)
                                                     .view(1, cells, 1).expand(batch, cells, genes))  # fmt: skip
            per_value = effect.gather(1, rank * bins // cells)
        shift = controls.mean(1) - self.control_mean[perturbation]
        return per_value + (self.contrast[perturbation].unsqueeze(1) * shift).unsqueeze(1)

    def forward(self, controls: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        batch, cells, genes = controls.shape
        tokens = self.attention(self.encoder(controls) + self.perturbation(perturbation).unsqueeze(1))
        context = self.context(tokens)  # batch × cells × gene_dim
        d = self.gene.shape[1]
        anchor = self.anchor(controls, perturbation)
        # the first layer of the per-value network on [value, set mean, gene, perturbation, context(, effect)],
        # computed term by term at each input's own resolution: the same function as on the concatenated
        # features, without materialising them (batch × cells × genes × (2 + 3·gene_dim) floats)
        first, last = self.value[0], self.value[2]
        w = first.weight  # hidden × inputs
        per_set = self.perturbation_gene(perturbation) @ w[:, 2 + d : 2 + 2 * d].T + first.bias  # batch × hidden
        per_cell = context @ w[:, 2 + 2 * d : 2 + 3 * d].T + per_set.unsqueeze(1)  # batch × cells × hidden
        per_gene = self.gene @ w[:, 2 : 2 + d].T  # genes × hidden
        scalars = [controls, controls.mean(1, keepdim=True).expand(batch, cells, genes)]
        columns = [0, 1]
        if self.effect_input:  # the residual sees the effect it corrects, so it can scale it per context
            scalars.append(anchor)
            columns.append(2 + 3 * d)
        hidden = torch.stack(scalars, dim=-1) @ w[:, columns].T  # batch × cells × genes × hidden
        hidden = hidden + per_cell.unsqueeze(2) + per_gene
        residual = last(self.value[1](hidden)).squeeze(-1)
        return controls + anchor + residual


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the cells of two batched sets, with a finite gradient at zero distance."""
    squared = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)
    return torch.sqrt(squared.clamp_min(0) + 1e-8)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance (V-statistic) between each pair of sets: ``2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖`` (batch,)."""
    return (2 * pairwise_distances(x, y).mean((-1, -2)) - pairwise_distances(x, x).mean((-1, -2))
            - pairwise_distances(y, y).mean((-1, -2)))  # fmt: skip


@torch.no_grad()
def respond(nets: list[PerturbationNet], controls: np.ndarray, code: int, set_size: int, *, random_state: int = 0,
            device: Any = "cpu") -> np.ndarray:  # fmt: skip
    """Predicted perturbed cells, one per control cell (network space): the mean of the networks' predictions.

    The controls are shuffled and cut into sets of ``set_size`` (the last set is filled up with
    cells drawn again, whose predictions are dropped), so every cell is predicted once, within a
    set of its own context; every network sees the same sets.
    """
    n = len(controls)
    order = np.random.default_rng(random_state).permutation(n)
    n_sets = -(-n // set_size)
    filler = np.random.default_rng(random_state + 1).choice(n, n_sets * set_size - n,
                                                             replace=n < n_sets * set_size - n)  # fmt: skip
    padded = np.concatenate([order, filler])
    x = torch.as_tensor(np.asarray(controls, np.float32)[padded].reshape(n_sets, set_size, -1), device=device)
    out = np.zeros((n, x.shape[-1]), np.float32)
    for net in nets:
        net = net.to(device).eval()
        for start in range(0, n_sets, 64):
            chunk = x[start : start + 64]
            predicted = net(chunk, torch.full((len(chunk),), code, device=device)).reshape(-1, x.shape[-1])
            rows = padded[start * set_size : (start + len(chunk)) * set_size]
            keep = np.arange(start * set_size, start * set_size + len(rows)) < n
            out[rows[keep]] += predicted.cpu().numpy()[keep] / len(nets)
    return out


class PerturbationModel:
    """A trained perturbation-response model (see :func:`cellmint.tl.train_perturbation`).

    Apply it with :func:`cellmint.tl.predict_perturbation`; save it with :meth:`save` or
    :func:`cellmint.io.write_model`.

    Attributes
    ----------
    nets
        The networks (one per inner fold of the training contexts, or one); their predictions are averaged.
    genes
        The ordered gene panel of the networks' predictions.
    perturbations
        The perturbations the model knows (the control excluded).
    control
        The label of control cells in ``perturbation_key``.
    perturbation_key, context_key
        The obs columns the model was trained with.
    recipe
        Input kind and normalisation (:class:`~cellmint.models._normalize.InputRecipe`).
    use_rep
        The ``obsm`` key the networks work in (``None``: the gene panel).
    stack
        What the default prediction (:func:`cellmint.tl.predict_perturbation`, ``predictor="stack"``)
        needs: ``{"genes", "contexts", "pairs", "control_bulk", "perturbed_bulk", "weights",
        "baseline_weights", "components", "alpha"}`` (see :mod:`cellmint.tl._perturbation_stack`),
        or None (a model trained with ``stack=False``, or written by cellmint before stacking).
    manifest
        Everything else recorded at training time (parameters, data summary, training history).
    """

    def __init__(self, nets: PerturbationNet | list[PerturbationNet], *, genes: list[str], perturbations: list[str],
                 control: str, perturbation_key: str, context_key: str | None, recipe: InputRecipe,
                 use_rep: str | None, decoder: dict[str, np.ndarray] | None, manifest: dict[str, Any],
                 stack: dict[str, Any] | None = None):  # fmt: skip
        self.nets = [n.eval() for n in (nets if isinstance(nets, list | tuple) else [nets])]
        self.genes = pd.Index(genes)
        self.perturbations = list(perturbations)
        self.control = control
        self.perturbation_key = perturbation_key
        self.context_key = context_key
        self.recipe = recipe
        self.use_rep = use_rep
        self.decoder = decoder  # {"weight": features × genes, "bias": genes} when use_rep is set
        self.stack = stack
        self.manifest = manifest
        self.path: Path | None = None

    @property
    def net(self) -> PerturbationNet:
        """The first network (the only one of a model trained without inner folds)."""
        return self.nets[0]

    @property
    def set_size(self) -> int:
        """Cells per set the network was trained on (predictions run in sets of this size)."""
        return int(self.manifest["params"]["set_size"])

    def perturbation_codes(self, perturbations: list[str]) -> np.ndarray:
        """Indices of perturbation labels; an unknown label (or the control) is an error, never a fallback."""
        index = pd.Index(self.perturbations)
        codes = index.get_indexer(pd.Index(perturbations, dtype=object))
        unknown = [p for p, c in zip(perturbations, codes, strict=True) if c < 0]
        if unknown:
            hint = " (the control itself is not a perturbation)" if self.control in unknown else ""
            raise ValueError(f"Unknown perturbation(s) {unknown[:5]}{hint}: the model was trained on "
                             f"{len(self.perturbations)} perturbations, e.g. {self.perturbations[:5]}.")  # fmt: skip
        return codes.astype(np.int64)

    def stack_weights(self, *, baselines_only: bool = False) -> pd.DataFrame:
        """The stacking weights (perturbations × components): of the default prediction, or of the baselines alone.

        The second are those of genes outside the networks' panel. Empty without a stack.
        """
        if self.stack is None:
            return pd.DataFrame(index=self.perturbations)
        key = "baseline_weights" if baselines_only else "weights"
        components = list(self.stack["components"])[1:] if baselines_only else list(self.stack["components"])
        return pd.DataFrame(np.asarray(self.stack[key]), index=self.perturbations, columns=components)

    def respond(self, controls: np.ndarray, perturbation: str, *, random_state: int = 0,
                device: Any = "cpu") -> np.ndarray:  # fmt: skip
        """Predicted perturbed cells, one per control cell (network space), for one context's controls."""
        code = int(self.perturbation_codes([perturbation])[0])
        return respond(self.nets, controls, code, self.set_size, random_state=random_state, device=device)

    def shifted_genes(self, values: np.ndarray, predicted: np.ndarray, genes: np.ndarray) -> np.ndarray:
        """Network predictions as log-normalised expression over :attr:`genes`, next to the cells' own ``genes`` values.

        In gene space, the prediction itself (≥ 0). For an embedding (``use_rep``), the decoded
        *change* is added to the cells' measured values: ``max(genes + (predicted − values) @ W, 0)``,
        so the decoder's reconstruction error of the cells themselves does not count as an effect.
        """
        if self.decoder is None:
            return np.clip(predicted, 0, None)
        change = (predicted - values) @ self.decoder["weight"]
        return np.clip(genes + change, 0, None)

    def to_genes(self, values: np.ndarray) -> np.ndarray:
        """Network-space values as log-normalised expression over :attr:`genes` (decoded for ``use_rep``), ≥ 0."""
        if self.decoder is not None:
            values = values @ self.decoder["weight"] + self.decoder["bias"]
        return np.clip(values, 0, None).astype(np.float32, copy=False)

    # -- persistence -----------------------------------------------------------------------------
    def _manifest(self) -> dict:
        return {
            **self.manifest,
            "genes": list(map(str, self.genes)),
            "perturbations": self.perturbations,
            "control": self.control,
            "perturbation_key": self.perturbation_key,
            "context_key": self.context_key,
            "recipe": self.recipe.to_dict(),
            "use_rep": self.use_rep,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model folder (``manifest.json`` with checksums, ``weights.pt``); returns its path.

        An existing folder is replaced only with ``overwrite=True`` (as a whole).
        """
        state = {f"nets.{i}.{k}": v for i, net in enumerate(self.nets) for k, v in net.state_dict().items()}
        if self.decoder is not None:
            state |= {f"decoder.{k}": torch.as_tensor(v) for k, v in self.decoder.items()}
        manifest = self._manifest() | {"n_nets": len(self.nets)}
        if self.stack is not None:
            arrays = {k: v for k, v in self.stack.items() if isinstance(v, np.ndarray)}
            state |= {f"stack.{k}": torch.as_tensor(v) for k, v in arrays.items()}
            manifest["stack"] = {k: v for k, v in self.stack.items() if k not in arrays}
        self.manifest = write_artifact(path, manifest, state, kind=KIND, format_version=FORMAT_VERSION,
                                       overwrite=overwrite)  # fmt: skip
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> PerturbationModel:
        """Read a model folder, refusing damaged, modified or newer-format folders (older formats load)."""
        manifest, state = read_artifact(path, kind=KIND, format_version=FORMAT_VERSION)
        decoder = {k.split(".", 1)[1]: state.pop(k).numpy() for k in list(state) if k.startswith("decoder.")}
        stack = None
        if "stack" in manifest:
            stack = dict(manifest["stack"]) | {k.split(".", 1)[1]: state.pop(k).numpy() for k in list(state)
                                               if k.startswith("stack.")}  # fmt: skip
        arch = manifest["architecture"]
        if "n_nets" not in manifest:  # formats 1 and 2: one network, its keys unprefixed
            states = [state]
        else:
            states = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"nets.{i}.")}
                      for i in range(manifest["n_nets"])]  # fmt: skip
        nets = []
        for one in states:
            net = PerturbationNet(arch["n_features"], len(manifest["perturbations"]), hidden=arch["hidden"],
                                  n_layers=arch["n_layers"], n_heads=arch["n_heads"], dropout=arch["dropout"],
                                  gene_dim=arch["gene_dim"], effect_bins=arch.get("effect_bins", 1),
                                  effect_input=arch.get("effect_input", False))  # fmt: skip
            if "average_effect" in one:  # folders written before binned effects: one bin, the same predictions
                one["binned_effect"] = one.pop("average_effect").unsqueeze(1)
            try:
                net.load_state_dict(one)
            except RuntimeError as err:
                raise ValueError(f"The weights in {path} do not fit the architecture in its manifest: {err}") from err
            nets.append(net)
        model = cls(nets, genes=manifest["genes"], perturbations=manifest["perturbations"],
                    control=manifest["control"], perturbation_key=manifest["perturbation_key"],
                    context_key=manifest["context_key"], recipe=InputRecipe(**manifest["recipe"]),
                    use_rep=manifest["use_rep"], decoder=decoder or None, manifest=manifest, stack=stack)  # fmt: skip
        model.path = Path(path)
        return model

    def uns_summary(self) -> dict:
        """h5ad-writable metadata for ``adata.uns[key_added]`` (the weights stay in the model folder)."""
        m = self._manifest()
        return h5ad_safe({
            "model_dir": str(self.path) if self.path is not None else "",
            "cellmint_version": m.get("cellmint_version", ""),
            "perturbation_key": self.perturbation_key,
            "context_key": self.context_key or "",
            "control": self.control,
            "perturbations": self.perturbations,
            "genes": list(map(str, self.genes)),
            "recipe": self.recipe.to_dict(),
            "use_rep": self.use_rep or "",
            "params": m.get("params", {}),
            "data": m.get("data", {}),
            "history": m.get("history", {}),
            "files": m.get("files", {}),
            "n_nets": len(self.nets),
            "stack": {} if self.stack is None else {
                "components": list(self.stack["components"]),
                "weights": self.stack["weights"], "baseline_weights": self.stack["baseline_weights"],
                "n_genes": len(self.stack["genes"]),
            },
        })  # fmt: skip

    def __repr__(self) -> str:
        space = f"obsm[{self.use_rep!r}] → " if self.use_rep else ""
        stacked = f", stacked with baselines over {len(self.stack['genes']):,} genes" if self.stack else ""
        return (f"PerturbationModel({len(self.perturbations)} perturbations, {space}{len(self.genes):,} genes, "
                f"{len(self.nets)} network(s){stacked}; input {self.recipe.kind}; "
                f"context {self.context_key!r})")  # fmt: skip
