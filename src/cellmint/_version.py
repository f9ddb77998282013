"""The version of cellmint, read once from the installed package's metadata (as scanpy does).

A leaf module: it imports nothing of cellmint, so that the package root and the modules that record the
version in what they write (model folders, stores, the command line) all read it from here.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

try:  # the version lives in pyproject.toml; an installed cellmint (wheel or editable) knows it
    __version__ = metadata.version("cellmint")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
