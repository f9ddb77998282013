"""Shared numpydoc fragments, injected with :func:`doc_params` (scanpy's ``_doc_params`` habit).

A function docstring writes ``{doc_adata}`` where the fragment goes; the decorator cleans the
docstring first, so fragments are written for zero indentation (parameter name at column 0, its
description indented by four spaces).
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import cleandoc
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_adata = """\
adata
    Annotated data matrix (cells × genes): an in-memory :class:`~anndata.AnnData` (dense, CSR or
    CSC), a backed AnnData (``anndata.read_h5ad(path, backed="r")``), a dask-backed AnnData, or a
    path to an ``.h5ad`` file or ``.zarr`` store, which is opened lazily and never loaded whole."""

doc_layer = """\
layer
    Use ``adata.layers[layer]`` instead of ``adata.X``."""

doc_chunk_size = """\
chunk_size
    Number of cells read at a time. ``None`` picks a size that keeps each chunk near 256 MiB, from
    the matrix's average number of stored values per cell. Peak memory grows with this number."""

doc_random_state = """\
random_state
    Seed for the local random number generator (never the global one); recorded in ``uns``."""

doc_copy = """\
copy
    Return a modified copy instead of writing to ``adata``."""

doc_inplace = """\
inplace
    Write results into ``adata``; otherwise return them."""

doc_key_added = """\
key_added
    Prefix of the keys written to ``adata`` (see Returns)."""

doc_progress = """\
progress
    Show a progress bar. ``None`` shows one in an interactive terminal or notebook and stays quiet
    in CI, in logs and when output is redirected; ``True``/``False`` force it on/off."""

doc_device = """\
device
    Torch device: ``"auto"`` takes CUDA when available, else CPU; ``"cuda"``, ``"cuda:1"``,
    ``"mps"`` or ``"cpu"`` ask for one explicitly and fail loudly when it is missing — never a silent
    fallback to the CPU."""

doc_show = """\
show
    Show the figure (``None``: as matplotlib's interactive mode says).
return_fig
    Return the figure."""

doc_plot_returns = """\
The figure with ``return_fig=True``; the axes with ``show=False``; otherwise ``None``."""

_FRAGMENTS = {name: value for name, value in globals().items() if name.startswith("doc_") and isinstance(value, str)}


def doc_params(**replacements: str) -> Callable[[F], F]:
    """Fill ``{name}`` fields of the decorated object's docstring with shared fragments.

    Called without arguments it uses every ``doc_*`` fragment of this module; keyword arguments add
    or override fragments.
    """
    fragments = {**_FRAGMENTS, **replacements}

    def decorate(obj: F) -> F:
        if obj.__doc__ is not None:
            obj.__doc__ = cleandoc(obj.__doc__).format_map(fragments)
        return obj

    return decorate
