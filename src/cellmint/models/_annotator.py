"""``cm.Annotator``: a trained multi-level cell-type classifier and everything needed to apply it.

An annotator is its network plus the facts that make its outputs meaningful: the ordered gene
panel, the label levels and classes, the label tree learned from the training data, the input
recipe (shared normalisation), per-level temperatures, metrics and the training parameters. It is
saved as a model folder (``models/_artifact.py``) and summarised in ``adata.uns`` when trained from
an AnnData.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._utils._device import dense_rows
from ._artifact import h5ad_safe, read_artifact, write_artifact
from ._network import AnnotatorNet
from ._normalize import InputRecipe, normalize

KIND = "cellmint.Annotator"
REFERENCE = "reference.npz"  # latent + labels of reference cells (nearest-neighbour refinement, open set)
CALIBRATION = "calibration.npz"  # conformal scores and classes of held-out reference cells, per level
#: 1: manifest + weights.pt; encoder/heads/regressors as in ``_network``; 2: the manifest carries its own
#: checksum (``_artifact``). Version 1 folders are still read.
FORMAT_VERSION = 2


#: the label of cells annotate does not trust; when a reference has a class of that name (CBMC's unassigned
#: cells are called "Unknown"), the first of the others that is no class becomes the model's label instead
UNKNOWN = "Unknown"
_UNKNOWN_FALLBACKS = ("Unassigned", "Unknown (cellmint)", "cellmint: Unknown")


def choose_unknown_label(classes: dict[str, list[str]], requested: str | None = None) -> str:
    """The label of untrusted cells for a model with these ``classes``: ``requested``, or chosen automatically.

    ``None``: ``"Unknown"``, or ``"Unassigned"`` (then another name) when some level has a class called
    so. A ``requested`` label that is a class name is an error: untrusted cells would be indistinguishable.
    """
    names = {str(c) for level in classes.values() for c in level}
    if requested is not None:
        if not isinstance(requested, str) or not requested:
            raise TypeError(f"unknown_label must be a non-empty string, not {requested!r}.")
        if requested in names:
            level = next(level for level, c in classes.items() if requested in map(str, c))
            raise ValueError(f"unknown_label={requested!r} is a class of the reference (level {level!r}): untrusted "
                             "cells would be indistinguishable from it. Pass another name.")  # fmt: skip
        return requested
    return next(name for name in (UNKNOWN, *_UNKNOWN_FALLBACKS) if name not in names)


def learn_hierarchy(codes: dict[str, np.ndarray], classes: dict[str, list[str]]) -> dict[str, dict]:
    """For each level after the first, the parent (at the level before) of every class and how pure it is.

    ``{fine_level: {"parent_level": coarse_level, "parents": {fine: coarse}, "purity": {fine: fraction}}}``:
    the parent is the coarse class most of the fine class's cells carry; purity is that fraction
    (1.0 for a clean tree).
    """
    levels = list(classes)
    tree = {}
    for coarse, fine in itertools.pairwise(levels):
        table = pd.crosstab(codes[fine], codes[coarse])
        parents, purity = {}, {}
        for fine_code, row in table.iterrows():
            parents[classes[fine][fine_code]] = classes[coarse][int(row.idxmax())]
            purity[classes[fine][fine_code]] = float(row.max() / row.sum())
        tree[fine] = {"parent_level": coarse, "parents": parents, "purity": purity}
    return tree


#: device types on which the host densifies sparse values (numba, SciPy: 3-6x faster on a CPU than torch's
#: scatter); any other device (a GPU) is sent the stored values as CSR and densifies them itself
HOST_DENSIFIED = ("cpu",)


def host_densifies(device: torch.device) -> bool:
    """Whether sparse values meant for ``device`` are densified on the host (:data:`HOST_DENSIFIED`)."""
    return torch.device(device).type in HOST_DENSIFIED


def _dense_on(X: sp.spmatrix, device: torch.device) -> torch.Tensor:
    """A sparse matrix densified on ``device``: only its stored values are sent there."""
    X = sp.csr_matrix(X)
    counts = torch.from_numpy(np.diff(X.indptr).astype(np.int64)).to(device)
    columns = torch.from_numpy(X.indices).to(device)
    values = torch.from_numpy(X.data.astype(np.float32, copy=False)).to(device)
    return dense_rows(counts, columns, values, X.shape[1], X.nnz)


class Annotator:
    """A trained annotator (see :func:`cellmint.tl.train_annotator`); apply it with ``cm.tl.annotate``.

    Attributes
    ----------
    genes
        The ordered gene panel of the network's input.
    classes
        Classes per label level, in head order.
    hierarchy
        Parent of each class at the level before (see :func:`learn_hierarchy`).
    recipe
        Input kind and normalisation (:class:`~cellmint.models._normalize.InputRecipe`).
    temperature
        Calibration temperature per level (1.0 = uncalibrated).
    manifest
        Everything else recorded at training time (parameters, data summary, resources).
    """

    def __init__(self, net: AnnotatorNet, *, genes: list[str], classes: dict[str, list[str]], hierarchy: dict,
                 recipe: InputRecipe, temperature: dict[str, float], manifest: dict[str, Any],
                 reference: dict | None = None, calibration: dict | None = None):  # fmt: skip
        self.net = net.eval()
        self.genes = pd.Index(genes)
        self.classes = {level: list(c) for level, c in classes.items()}
        self.hierarchy = hierarchy
        self.recipe = recipe
        self.temperature = dict(temperature)
        self.manifest = manifest
        self.reference = reference  # {"latent": cells × latent (float16), "codes": {level: int32}}
        self.calibration = calibration  # {level: {"score": float32, "class": int32}} (models/_conformal.py)
        self.path: Path | None = None

    @property
    def label_keys(self) -> list[str]:
        """Label levels, coarse to fine as given at training."""
        return list(self.classes)

    @property
    def unknown_label(self) -> str:
        """The label annotate gives untrusted cells by default (recorded at training; chosen for older models)."""
        return self.manifest.get("unknown_label") or choose_unknown_label(self.classes)

    @property
    def metrics(self) -> dict:
        """Holdout metrics per level (accuracy, macro-F1, recall per class, confusion, ECE)."""
        return self.manifest.get("metrics", {})

    # -- applying --------------------------------------------------------------------------------
    @torch.no_grad()
    def inputs(self, X: np.ndarray | sp.spmatrix | torch.Tensor, library_size: np.ndarray | None = None, *,
               device: Any = "cpu") -> torch.Tensor:  # fmt: skip
        """The network's input (the model's normalisation) of raw values over :attr:`genes`, on ``device``.

        ``library_size`` is each cell's total over all of its genes (default: the row sums of ``X``,
        right only when ``X`` holds every gene). The values are normalised on ``device``; a sparse ``X``
        is densified there too (a GPU is sent only the stored values; a CPU densifies faster with SciPy).
        """
        device = torch.device(device)
        if sp.issparse(X):
            X = X.toarray() if host_densifies(device) else _dense_on(X, device)
        X = torch.as_tensor(np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X)
        if X.ndim != 2 or X.shape[1] != len(self.genes):
            raise ValueError(f"Expected values over the model's {len(self.genes)} genes, got shape {tuple(X.shape)}.")
        library = X.sum(dim=1) if library_size is None else torch.as_tensor(np.asarray(library_size, np.float32))
        return normalize(X.to(device), library.to(device), self.recipe)

    @torch.no_grad()
    def outputs(self, inputs: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Latent, calibrated class probabilities per level and projected embeddings of network inputs.

        ``inputs``: what :meth:`inputs` gives (the network runs on their device). Returns ``(latent,
        {level: probabilities}, {embedding key: coordinates})``, the last empty unless the model
        learned ``embedding_keys``.
        """
        net = self.net.to(inputs.device)
        latent, logits, embedded = net(inputs)
        # owned NumPy copies, not views of torch tensors: a caller that keeps the small outputs of many
        # chunks would otherwise pin torch's freed chunk-sized blocks (8 MB per 1,000 cells, measured)
        probabilities = {
            level: torch.softmax(logits[level] / self.temperature.get(level, 1.0), dim=1).cpu().numpy().copy()
            for level in self.classes
        }
        scale = self.manifest.get("embedding_scale", {})
        projected = {key: values.cpu().numpy() * np.asarray(scale[key]["std"], np.float32)
                     + np.asarray(scale[key]["mean"], np.float32) for key, values in embedded.items()}  # fmt: skip
        return latent.cpu().numpy().copy(), probabilities, projected

    def forward(self, X: np.ndarray | sp.spmatrix | torch.Tensor, library_size: np.ndarray | None = None, *,
                device: Any = "cpu") -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
        """:meth:`outputs` of :meth:`inputs`: latent, calibrated probabilities and embeddings of raw values."""
        return self.outputs(self.inputs(X, library_size, device=device))

    def predict(self, X, library_size: np.ndarray | None = None) -> pd.DataFrame:
        """Most probable class per level (columns) for raw values over :attr:`genes` (rows: cells)."""
        _, probabilities, _ = self.forward(X, library_size)
        return pd.DataFrame({
            level: pd.Categorical.from_codes(p.argmax(axis=1), categories=self.classes[level])
            for level, p in probabilities.items()
        })  # fmt: skip

    # -- persistence -----------------------------------------------------------------------------
    def _manifest(self) -> dict:
        return {
            **self.manifest,
            "genes": list(map(str, self.genes)),
            "classes": self.classes,
            "hierarchy": self.hierarchy,
            "recipe": self.recipe.to_dict(),
            "temperature": self.temperature,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model folder (``manifest.json`` with checksums, ``weights.pt``); returns its path.

        An existing folder is replaced only with ``overwrite=True``, as a whole: a crash leaves the
        old model or the new one.
        """
        extra = {}
        if self.reference is not None:
            buffer = io.BytesIO()
            np.savez(buffer, latent=self.reference["latent"],
                     **{f"codes/{level}": codes for level, codes in self.reference["codes"].items()})  # fmt: skip
            extra[REFERENCE] = buffer.getvalue()
        if self.calibration is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **{f"{name}/{level}": values[name] for level, values in self.calibration.items()
                                for name in ("score", "class")})  # fmt: skip
            extra[CALIBRATION] = buffer.getvalue()
        self.manifest = write_artifact(path, self._manifest(), self.net.state_dict(), extra, kind=KIND,
                                       format_version=FORMAT_VERSION, overwrite=overwrite)  # fmt: skip
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Annotator:
        """Read a model folder, refusing damaged, modified or newer-format folders."""
        manifest, state, files = read_artifact(path, kind=KIND, format_version=FORMAT_VERSION, with_files=True)
        arch = manifest["architecture"]
        net = AnnotatorNet(len(manifest["genes"]), {level: len(c) for level, c in manifest["classes"].items()},
                           hidden=tuple(arch["hidden"]), dropout=arch["dropout"],
                           embeddings=arch.get("embeddings") or None, linear=arch.get("linear", False))  # fmt: skip
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"The weights in {path} do not fit the architecture in its manifest: {err}") from err
        reference = None
        if REFERENCE in manifest["files"]:  # checksum verified by read_artifact; plain arrays only
            with np.load(io.BytesIO(files[REFERENCE]), allow_pickle=False) as stored:
                reference = {"latent": stored["latent"],
                             "codes": {level: stored[f"codes/{level}"] for level in manifest["classes"]}}  # fmt: skip
        calibration = None
        if CALIBRATION in manifest["files"]:
            with np.load(io.BytesIO(files[CALIBRATION]), allow_pickle=False) as stored:
                calibration = {level: {name: stored[f"{name}/{level}"] for name in ("score", "class")}
                               for level in manifest["classes"]}  # fmt: skip
        model = cls(net, genes=manifest["genes"], classes=manifest["classes"], hierarchy=manifest["hierarchy"],
                    recipe=InputRecipe(**manifest["recipe"]), temperature=manifest["temperature"],
                    manifest=manifest, reference=reference, calibration=calibration)  # fmt: skip
        model.path = Path(path)
        return model

    def uns_summary(self) -> dict:
        """h5ad-writable metadata for ``adata.uns[key_added]`` (the weights stay in the model folder)."""
        m = self._manifest()
        return {
            "model_dir": str(self.path) if self.path is not None else "",
            "cellmint_version": m.get("cellmint_version", ""),
            "label_keys": self.label_keys,
            "unknown_label": self.unknown_label,
            "classes": {level: np.asarray(c, dtype=object) for level, c in self.classes.items()},
            "genes": np.asarray(self.genes, dtype=object),
            "recipe": self.recipe.to_dict(),
            "temperature": self.temperature,
            "params": h5ad_safe(m.get("params", {})),
            "metrics": h5ad_safe(
                {level: {k: v for k, v in r.items() if k != "confusion"} for level, r in m.get("metrics", {}).items()}
            ),
            "conformal": h5ad_safe(m.get("conformal", {})),
            "files": m.get("files", {}),
        }

    def __repr__(self) -> str:
        levels = ", ".join(f"{level} ({len(c)} classes)" for level, c in self.classes.items())
        return f"Annotator({len(self.genes):,} genes → {levels}; input {self.recipe.kind}/{self.recipe.transform})"
