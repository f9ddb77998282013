"""Crash-safe file replacement and manifest reading, shared by stores, their arrays and model folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def replace_atomically(path: Path, payload: bytes, *, durable: bool = True) -> None:
    """Write ``payload`` to ``path`` so that readers and crashes see the old file or the new one, never half.

    The bytes go to a temporary file beside ``path``, which is then renamed over it. With ``durable``
    the file and the rename are also flushed to disk (``fsync``), so they survive a power loss too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is durable
        finally:
            os.close(directory)


def read_manifest_file(folder: str | Path, name: str, *, what: str, noun: str) -> dict[str, Any]:
    """The JSON manifest ``folder/name``; a clear error when it is missing (``what``) or damaged (``noun``)."""
    file = Path(folder) / name
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a cellmint {what}: {name} is missing.")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"The manifest of the {noun} at {folder} is corrupted: {err}") from err
