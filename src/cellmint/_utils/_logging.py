"""Logging through scanpy's logger, so ``sc.settings.verbosity`` governs cellmint too.

Usage follows scanpy: ``start = logg.info("computing ...")`` then
``logg.info("    finished", time=start)``, which prints ``finished (0:00:01)``. Warnings a user must
act on go through :func:`warnings.warn` with ``stacklevel=2`` instead.
"""

from __future__ import annotations

from scanpy import logging as _sc_logging

error = _sc_logging.error
warning = _sc_logging.warning
info = _sc_logging.info
hint = _sc_logging.hint
debug = _sc_logging.debug

__all__ = ["debug", "error", "hint", "info", "warning"]
