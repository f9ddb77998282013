"""Model folders: ``manifest.json`` + weights, checked on load; never a pickle.

A model folder holds ``manifest.json`` (format version, package versions, everything needed to use
the model, and the sha256 of every other file) and the weights as a torch ``state_dict`` saved with
``torch.save`` and loaded with ``weights_only=True``, which refuses anything but tensors and plain
containers. Loading checks the format version and every checksum before reading a byte of weights,
so a damaged, tampered or incompatible folder is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._utils._files import read_manifest_file, replace_atomically

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(folder: str | Path, manifest: dict[str, Any], state_dict: dict[str, torch.Tensor],
                   extra: dict[str, bytes] | None = None, *, kind: str, format_version: int) -> dict:  # fmt: skip
    """Write a model folder: weights and ``extra`` files first, then the manifest naming their checksums.

    Returns the manifest as written (with versions and the ``files`` checksums).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    files = {WEIGHTS: buffer.getvalue(), **(extra or {})}
    for name, payload in files.items():
        replace_atomically(folder / name, payload)
    manifest = {
        "kind": kind,
        "format_version": format_version,
        "cellmint_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        **manifest,
        "files": {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()},
    }
    replace_atomically(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_artifact(folder: str | Path, *, kind: str, format_version: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and weights of a model folder, after checking its kind, format version and checksums."""
    folder = Path(folder)
    manifest = read_manifest_file(folder, MANIFEST, what="model folder", noun="model")
    if manifest.get("kind") != kind:
        raise ValueError(f"The model at {folder} is a {manifest.get('kind')!r}, not a {kind!r}.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > format_version:
        raise ValueError(f"The model at {folder} has format version {version!r} (cellmint "
                         f"{manifest.get('cellmint_version', '?')}); this cellmint reads up to version "
                         f"{format_version}. Upgrade cellmint.")  # fmt: skip
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"The model at {folder} is incomplete: {name} is missing.")
        if sha256_file(path) != expected:
            raise ValueError(f"The model file {path} does not match the checksum in its manifest: it was "
                             "damaged or modified after training. Refusing to load it.")  # fmt: skip
    if WEIGHTS not in manifest.get("files", {}):
        raise ValueError(f"The manifest of the model at {folder} lists no {WEIGHTS}.")
    state_dict = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    return manifest, state_dict
