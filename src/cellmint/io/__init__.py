"""Reading and writing: chunked access to matrices wherever they live; models and exports (``cm.io``)."""

from .._utils._chunks import RowChunk, iter_row_chunks

__all__ = ["RowChunk", "iter_row_chunks"]
