"""What every ``cm.pl`` function does last: lay out the figure, then return, show or hand back its axes."""

from __future__ import annotations

from typing import Any


def finish(fig: Any, ax: Any, *, show: bool | None, return_fig: bool):
    """The figure with ``return_fig``; the axes with ``show=False``; else shown (as matplotlib's mode says) and None."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if return_fig:
        return fig
    if show is False:
        return ax
    if show or plt.isinteractive():
        plt.show()
    return None
