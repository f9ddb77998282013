"""The on-disk training store: layout (``_format``), reader, crash-safe writer, inputs, and the ``Store`` façade."""

from .._utils._lock import LockBusyError
from ._format import StaleManifestError
from ._store import Store

__all__ = ["Store", "LockBusyError", "StaleManifestError"]
