"""Resource reports: wall time, throughput, peak memory (host and GPU) and device of one job.

Peak RSS is measured for the job's own window where the OS allows: on Linux the process's
high-water mark is reset through ``/proc/self/clear_refs`` at the start and read from
``/proc/self/status`` (``VmHWM``) at the end. Where that reset is refused or does not take effect,
the process-lifetime peak of :func:`resource.getrusage` is reported and ``peak_rss_scope`` says
``"process"``. Nested monitors fold the peak seen before an inner reset into every outer one, so
each still reports its own window (or, in ``"process"`` scope, the whole process's peak).
"""

from __future__ import annotations

import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
#: how far above the current RSS the peak may read just after a reset (other threads allocate meanwhile)
_RESET_SLACK = 64 * 2**20
#: monitors measuring now; weak, so that one abandoned by an exception between start() and stop() goes away
_ACTIVE: weakref.WeakSet[ResourceMonitor] = weakref.WeakSet()


def _read_status_kib(key: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now, in bytes (Linux), else ``None``."""
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _hwm_bytes() -> int | None:
    kib = _read_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter; ``True`` only where the reset is seen to take effect.

    A kernel (or sandbox) may accept the write and keep the old peak; the reset counts only when
    ``VmHWM`` reads back within :data:`_RESET_SLACK` of the current RSS, as a real reset leaves it.
    """
    try:
        _PROC_CLEAR_REFS.write_text("5")  # "5" resets the peak RSS counter (Linux >= 4.0)
    except OSError:
        return False
    hwm, rss = _hwm_bytes(), current_rss_bytes()
    return hwm is not None and rss is not None and hwm <= rss + _RESET_SLACK


def _lifetime_peak_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass
class ResourceReport:
    """Resources one job used. ``to_dict`` gives an h5ad-writable dict (no ``None`` values)."""

    wall_time_s: float
    device: str = "cpu"
    n_cells: int | None = None
    cells_per_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_rss_scope: str = "window"
    gpu_peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``uns`` or a manifest; keys with unknown values are left out."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        out.update({k: v for k, v in self.extra.items() if v is not None})
        return out

    def __str__(self) -> str:
        parts = [f"{self.wall_time_s:.2f} s"]
        if self.cells_per_s is not None:
            parts.append(f"{self.cells_per_s:,.0f} cells/s")
        label = "peak RSS" if self.peak_rss_scope == "window" else "process peak RSS"
        parts.append(f"{label} {_format_bytes(self.peak_rss_bytes)}")
        if self.gpu_peak_bytes is not None:
            parts.append(f"GPU peak {_format_bytes(self.gpu_peak_bytes)}")
        parts.append(f"device {self.device}")
        return ", ".join(parts)


class ResourceMonitor:
    """Context manager measuring one job; the report is in ``.report`` after the ``with`` block.

    Parameters
    ----------
    n_cells
        Cells processed, when known up front; otherwise count them with :meth:`add_cells`.
    device
        Device the job runs on (``"cpu"``, ``"cuda:0"``, a ``torch.device``). On CUDA, the peak
        memory allocated by torch is reported.

    Examples
    --------
    >>> with ResourceMonitor(n_cells=1000) as monitor:
    ...     pass
    >>> monitor.report.n_cells
    1000
    """

    def __init__(self, *, n_cells: int | None = None, device: Any = "cpu"):
        self.n_cells = n_cells
        self.device = str(device)
        self.report: ResourceReport | None = None
        self._peak_before_reset = 0
        self._scope = "window"

    def add_cells(self, n: int) -> None:
        """Count ``n`` more processed cells."""
        self.n_cells = (self.n_cells or 0) + int(n)

    def _cuda(self):
        if not self.device.startswith("cuda") or "torch" not in sys.modules:
            return None
        torch = sys.modules["torch"]
        return torch if torch.cuda.is_available() else None

    def __enter__(self) -> ResourceMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ResourceMonitor:
        """Start measuring (what ``with`` does); returns the monitor. For code that cannot be indented in a block."""
        hwm = _hwm_bytes()
        if hwm is not None:
            # before any write to clear_refs, even one not seen to take effect: the kernel may still have reset
            # its peak (and getrusage's, which a "process" monitor reads)
            for outer in _ACTIVE:
                outer._peak_before_reset = max(outer._peak_before_reset, hwm)
        if hwm is None or not _reset_hwm():
            self._scope = "process"
        if (torch := self._cuda()) is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        _ACTIVE.add(self)
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> ResourceReport:
        """Stop measuring; returns the report (also in ``.report``)."""
        wall = time.perf_counter() - self._t0
        _ACTIVE.discard(self)
        peak = _hwm_bytes() if self._scope == "window" else _lifetime_peak_bytes()
        if peak is not None:
            peak = max(self._peak_before_reset, peak)
        gpu_peak = None
        if (torch := self._cuda()) is not None:
            torch.cuda.synchronize(self.device)
            gpu_peak = int(torch.cuda.max_memory_allocated(self.device))
        rate = self.n_cells / wall if self.n_cells is not None and wall > 0 else None
        self.report = ResourceReport(
            wall_time_s=wall,
            device=self.device,
            n_cells=self.n_cells,
            cells_per_s=rate,
            peak_rss_bytes=peak,
            peak_rss_scope=self._scope,
            gpu_peak_bytes=gpu_peak,
        )
        return self.report
