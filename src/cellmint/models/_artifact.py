"""Model folders: ``manifest.json`` + weights, checked on load; never a pickle.

A model folder holds ``manifest.json`` (format version, package versions, everything needed to use
the model, the sha256 of every other file, and from format 2 the sha256 of the manifest itself) and
the weights as a torch ``state_dict`` saved with ``torch.save`` and loaded with ``weights_only=True``,
which refuses anything but tensors and plain containers. Loading checks the format version and every
checksum before reading a byte of weights, so a damaged, edited or incompatible folder is refused
with a clear error. Saving replaces the folder as a whole, under a writer lock: a crash leaves the
old model or the new one, never a mixture (see ``docs/guarantees.md``).

Format versions: 1 (manifest without its own checksum; still read), 2 (sealed manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import _logging as logg
from .._utils._files import (
    SEAL,
    check_sealed,
    lock_path,
    manifest_bytes,
    read_folder_files,
    replace_folder,
    write_file,
)
from .._utils._lock import writer_lock
from .._version import __version__

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
#: files a model folder may hold besides those its manifest lists (never carried into a replacement)
MODEL_FILES = {MANIFEST, WEIGHTS, "reference.npz"}
#: the first format whose manifest carries its own checksum (``manifest_sha256``)
SEALED_FORMAT = 2
_TEMPORARY = re.compile(r"^\..*\.tmp\d+$")
_warned_unsealed: set[str] = set()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(folder: Path) -> set[str]:
    """The files the manifest of an existing model folder lists (none when it has no readable manifest)."""
    try:
        return set(json.loads((folder / MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def check_writable(folder: str | Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing model folder (or any file or non-empty folder there) without ``overwrite``.

    Called before training too, so that a long run never ends in this error.
    """
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file; a model is saved to a folder. Choose another path.")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        what = "a model folder" if (folder / MANIFEST).is_file() else "a folder that is not empty"
        raise FileExistsError(f"{folder} is {what}; pass overwrite=True to replace it (the old model stays whole "
                              "until the new one is complete), or choose another path.")  # fmt: skip


def write_artifact(folder: str | Path, manifest: dict[str, Any], state_dict: dict[str, torch.Tensor],
                   extra: dict[str, bytes] | None = None, *, kind: str, format_version: int,
                   overwrite: bool = False) -> dict:  # fmt: skip
    """Write a model folder: weights, ``extra`` files and the sealed manifest naming their checksums.

    An existing folder is replaced only with ``overwrite`` (:func:`check_writable`).

    The folder is replaced as a whole (:func:`cellmint._utils._files.replace_folder`): the new model is
    written and flushed to disk beside the old one, then swapped in by renames, under the folder's
    writer lock. A crash at any moment leaves the old model or the new one; files of the old folder
    that are not part of a model are carried over. Returns the manifest as written.
    """
    folder = Path(folder)
    check_writable(folder, overwrite=overwrite)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    files = {WEIGHTS: buffer.getvalue(), **(extra or {})}
    manifest = {
        "cellmint_version": __version__,  # of training: a model saved again keeps its own
        "torch_version": torch.__version__.split("+")[0],
        **{k: v for k, v in manifest.items() if k != SEAL},
        "kind": kind,
        "format_version": format_version,  # of this writer
        "files": {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()},
    }
    payload = manifest_bytes(manifest)

    def fill(new: Path) -> None:
        for name, content in files.items():
            write_file(new / name, content, durable=True)
        write_file(new / MANIFEST, payload, durable=True)  # last: a folder with a manifest is complete

    folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(lock_path(folder), what=f"the model folder {folder}"):
        ours = MODEL_FILES | set(files) | _listed_files(folder)
        replace_folder(folder, fill, keep=lambda name: name not in ours and not _TEMPORARY.match(name))
    return manifest


def _file_names(manifest: dict, folder: Path) -> list[str]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"The manifest of the model at {folder} has no table of file checksums ('files').")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"The manifest of the model at {folder} lists a file outside the folder ({name!r}).")
    return list(files)


def _load_weights(payload: bytes, path: Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from the bytes of ``weights.pt`` (``weights_only``: never an arbitrary object)."""
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for foreign files
        raise ValueError(f"{path} is not a weights file cellmint can read: torch found no tensor state dict in it "
                         f"({type(err).__name__}). cellmint never loads pickled objects; restore the model folder "
                         "from a copy or train the model again.") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):  # fmt: skip
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors; restore the "
                         "model folder from a copy or train the model again.")  # fmt: skip
    return state


def read_artifact(folder: str | Path, *, kind: str, format_version: int, with_files: bool = False) -> tuple:
    """The manifest and weights of a model folder, after checking kind, format version and checksums.

    The manifest's own checksum (``manifest_sha256``, required from format 2) and the sha256 of every
    listed file are checked on the bytes that are then used, read as one version of the folder even
    while another process replaces it. Returns ``(manifest, state_dict)``, and with ``with_files`` also
    ``{file name: bytes}`` of every listed file (use these bytes, not the files again).
    """
    folder = Path(folder)
    manifest, files = read_folder_files(folder, lambda m: _file_names(m, folder), MANIFEST, where="model folder")
    if manifest.get("kind") != kind:
        raise ValueError(f"The model at {folder} is a {manifest.get('kind')!r}, not a {kind!r}.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > format_version or version < 1:
        raise ValueError(f"The model at {folder} has format version {version!r} (cellmint "
                         f"{manifest.get('cellmint_version', '?')}); this cellmint reads versions 1 to "
                         f"{format_version}. Upgrade cellmint.")  # fmt: skip
    check_sealed(manifest, f"the model at {folder}")
    if SEAL not in manifest:
        if version >= SEALED_FORMAT:
            raise ValueError(f"The manifest of the model at {folder} lacks its checksum (manifest_sha256), which "
                             f"format {version} always writes: it was edited. Refusing to load it.")  # fmt: skip
        if str(folder) not in _warned_unsealed:
            _warned_unsealed.add(str(folder))
            logg.warning(f"the model at {folder} was written by cellmint {manifest.get('cellmint_version', '?')}, "
                         "whose manifests carry no checksum of their own; save it again "
                         "(cm.io.write_model(cm.io.read_model(path), path, overwrite=True)) to add one")  # fmt: skip
    for name, expected in manifest["files"].items():
        if files[name] is None:
            raise FileNotFoundError(f"The model at {folder} is incomplete: {name} is missing.")
        if hashlib.sha256(files[name]).hexdigest() != expected:
            raise ValueError(f"The model file {folder / name} does not match the checksum in its manifest: it was "
                             "damaged or modified after training. Refusing to load it.")  # fmt: skip
    if WEIGHTS not in manifest["files"]:
        raise ValueError(f"The manifest of the model at {folder} lists no {WEIGHTS}.")
    state = _load_weights(files[WEIGHTS], folder / WEIGHTS)
    return (manifest, state, files) if with_files else (manifest, state)


def h5ad_safe(value: Any) -> Any:
    """Nested dicts of numbers/strings/lists as h5ad can write them (None → "", lists → arrays)."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [h5ad_safe(v) for v in value]
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object)
        if all(isinstance(v, int | float | bool | np.number) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    return "" if value is None else value
