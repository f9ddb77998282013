"""Progress bars that show for a person and stay quiet in CI and logs.

``progress=None`` (the default everywhere) shows a bar when someone is watching: a Jupyter kernel,
or a terminal on stderr. It stays off under CI (``CI`` set), when stderr is redirected to a file or
pipe, and when scanpy's verbosity is below ``warning``. ``CELLMINT_PROGRESS=1``/``0`` overrides
the automatic choice; ``progress=True``/``False`` overrides everything.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_TRUTHY = {"1", "true", "yes", "on"}
_FALSY = {"0", "false", "no", "off"}


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show_progress(progress: bool | None = None) -> bool:
    """Whether a progress bar should be drawn for this ``progress`` argument."""
    if progress is not None:
        return bool(progress)
    forced = os.environ.get("CELLMINT_PROGRESS", "").strip().lower()
    if forced in _TRUTHY:
        return True
    if forced in _FALSY:
        return False
    if os.environ.get("CI"):
        return False
    from scanpy import settings

    if settings.verbosity < 1:  # below "warning": the user asked for silence
        return False
    if _in_notebook():
        return True
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def progress_bar(
    iterable: Any = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    progress: bool | None = None,
    **kwargs: Any,
):
    """A :mod:`tqdm` bar (notebook widget where available), disabled when :func:`show_progress` says so.

    Use it as a context manager or iterate over it, exactly like ``tqdm``.
    """
    enabled = show_progress(progress)
    tqdm = _tqdm_class() if enabled else _plain_tqdm()
    kwargs.setdefault("unit_scale", unit == "cells")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, **kwargs)


def _plain_tqdm():
    from tqdm.std import tqdm

    return tqdm


def _tqdm_class():
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it; fall back silently)
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    return _plain_tqdm()


def format_duration(seconds: float) -> str:
    """A duration for people: ``"40 s"``, ``"12 min"``, ``"1 h 20 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
