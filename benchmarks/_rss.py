"""Resident memory of this process, read from ``/proc/self/status`` (Linux; -1 elsewhere).

Standard library only, so the peer tools' workers (CellTypist in its own environment, scanpy) can
measure themselves without importing cellmint, whose imports would count in their memory.
"""

from __future__ import annotations

from pathlib import Path


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return -1


def peak_rss_bytes() -> int:
    """The process's high-water mark of resident memory (``VmHWM``)."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int:
    """The process's resident memory now (``VmRSS``)."""
    return _status_bytes("VmRSS")
