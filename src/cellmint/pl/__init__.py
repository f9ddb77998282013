"""Plotting: the figures a biologist checks before trusting results (``cm.pl``)."""

__all__: list[str] = []
