"""What every entry point shares: the choice of device."""
from __future__ import annotations

import torch


def mps_available() -> bool:
    """An Apple GPU that PyTorch can use (Metal Performance Shaders)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(device: str = "auto", *, cuda: bool | None = None, mps: bool | None = None) -> str:
    """'auto' is the first of cuda, mps (Apple GPUs), cpu that this machine has; anything else is
    returned as given. cuda and mps override what is detected (for tests)."""
    if device != "auto":
        return device
    if torch.cuda.is_available() if cuda is None else cuda:
        return "cuda"
    if mps_available() if mps is None else mps:
        return "mps"
    return "cpu"
