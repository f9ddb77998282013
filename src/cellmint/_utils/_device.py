"""Torch device resolution: ``"auto"`` picks the best available; an explicit device must exist."""

from __future__ import annotations

from typing import Any


def resolve_device(device: Any = "auto"):
    """A ``torch.device``: ``"auto"`` → CUDA, else Apple MPS, else CPU; ``"cuda"``/``"mps"`` without one is an error."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:1' or "
                         "'mps'.") from None  # fmt: skip
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for, but torch sees no CUDA GPU on this machine "
                               "(use device='auto' or 'cpu').")  # fmt: skip
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={device!r} was asked for, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s).")  # fmt: skip
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"device={device!r} was asked for, but Apple MPS is not available here.")
    return resolved


def dense_rows(counts, columns, values, n_columns: int, total: int):
    """Stored values scattered into a dense block on their device: row ``i`` holds the next ``counts[i]`` of them.

    ``counts``, ``columns`` and ``values`` are tensors on one device; ``total`` is ``counts.sum()``,
    known on the host (no device sync). A column stored twice in a row adds up, as SciPy's
    ``toarray`` does. The only copy made is the dense block, on the device: a GPU densifies what the
    host sent as CSR.
    """
    import torch

    device = values.device
    cells = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=total)
    dense = torch.zeros(len(counts) * n_columns, dtype=values.dtype, device=device)
    dense.index_add_(0, cells * n_columns + columns.long(), values)
    return dense.view(len(counts), n_columns)
