"""Where tensors live: the bottom of the library (imports torch and ``morphlib.errors`` only).

``resolve_device(None)`` is CUDA when a GPU is present, else CPU; asking for ``"cuda"`` without one is a
one-line error, never a silent CPU fallback.
"""

from __future__ import annotations

import torch

from morphlib.errors import MorphError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """``device`` (a name, a ``torch.device`` or None for the default) as a ``torch.device``."""
    try:
        dev = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as exc:
        raise MorphError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MorphError("device 'cuda' was asked for but no CUDA GPU is available here")
    return dev
