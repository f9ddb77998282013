"""Reading and writing models and exports (``cm.io``)."""

__all__: list[str] = []
