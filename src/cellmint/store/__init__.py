"""The on-disk training store: layout (``_format``), crash-safe writer, inputs, and the ``Store`` reader."""

from .._utils._lock import LockBusyError
from ._format import StaleManifestError
from ._store import Store

__all__ = ["Store", "LockBusyError", "StaleManifestError"]
