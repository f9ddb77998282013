"""Preprocessing: statistics and on-disk stores for atlas-scale data (``cm.pp``).

Filled by the HVG and store issues; empty until then rather than holding placeholders.
"""

__all__: list[str] = []
