"""The on-disk training store: layout (``_format``), crash-safe writer, inputs, and the ``Store`` reader."""

from ._store import Store

__all__ = ["Store"]
