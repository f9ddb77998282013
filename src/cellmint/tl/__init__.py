"""Tools: train and apply annotators and perturbation models (``cm.tl``)."""

__all__: list[str] = []
