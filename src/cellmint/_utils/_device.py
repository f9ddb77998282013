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
