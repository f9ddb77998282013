"""Reading and writing: chunked access to matrices wherever they live; models and exports (``cm.io``)."""

from .._utils._chunks import RowChunk, iter_row_chunks
from ._export import to_hf_dataset
from ._models import read_model, write_model

__all__ = ["RowChunk", "iter_row_chunks", "read_model", "write_model", "to_hf_dataset"]
