"""``cm.io.read_model`` / ``cm.io.write_model``: model folders, whatever the kind of model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._utils._files import check_sealed, read_folder_files
from ..models._annotator import KIND as ANNOTATOR
from ..models._annotator import Annotator
from ..models._artifact import MANIFEST
from ..models._perturbation import KIND as PERTURBATION
from ..models._perturbation import PerturbationModel

_KINDS = {ANNOTATOR: Annotator, PERTURBATION: PerturbationModel}


def read_model(path: str | Path) -> Any:
    """Load a model folder written by cellmint, checking its checksums.

    An :class:`~cellmint.Annotator` or a :class:`~cellmint.PerturbationModel`, as its manifest says.

    Parameters
    ----------
    path
        The model folder (holding ``manifest.json``).

    Returns
    -------
    The model, of the kind its manifest names.
    """
    manifest = read_folder_files(path, lambda manifest: [], MANIFEST, where="model folder")[0]
    kind = manifest.get("kind")
    if kind not in _KINDS:
        check_sealed(manifest, f"the model folder at {path}")  # an edited kind is an edit, not a new kind
        raise ValueError(f"The model at {path} is of kind {kind!r}, which this cellmint cannot read ({list(_KINDS)}).")
    return _KINDS[kind].load(path)


def write_model(model: Any, path: str | Path) -> Path:
    """Save a model to a folder (``manifest.json`` with the sha256 of every file, weights); returns the folder.

    Parameters
    ----------
    model
        A trained model, e.g. from :func:`cellmint.tl.train_annotator`.
    path
        The folder to write (created if needed).
    """
    if not isinstance(model, tuple(_KINDS.values())):
        raise TypeError(f"write_model saves cellmint models, not {type(model).__name__}.")
    return model.save(path)


def resolve_model(adata: Any, model: Any, key_added: str, kind: type):
    """The model a tool was given, loaded and of the expected ``kind``.

    ``model`` is a loaded model of ``kind``, a model folder, or ``None`` for the folder named in
    ``adata.uns[key_added]["model_dir"]``; anything else, or a folder of another kind, is an error.
    """
    if isinstance(model, kind):
        return model
    if model is None:
        uns = getattr(adata, "uns", {})
        if key_added not in uns or not uns[key_added].get("model_dir"):
            raise ValueError(f"No model given and adata.uns[{key_added!r}] names no model folder; pass model=.")
        model = uns[key_added]["model_dir"]
    if not isinstance(model, str | Path):
        raise TypeError(f"model must be a {kind.__name__} or a model folder, not {type(model).__name__}.")
    loaded = read_model(model)
    if not isinstance(loaded, kind):
        raise TypeError(f"The model at {model} is a {type(loaded).__name__}, not a {kind.__name__}.")
    return loaded
