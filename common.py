"""What the entry points share: the choice of device, printing on the first process only, and
writing JSON safely."""
from __future__ import annotations

import json
import os
from typing import Protocol

import torch


class Ranked(Protocol):
    master: bool  # the first process (distributed.Dist is one)


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


def write_json_atomic(path: str, data: dict) -> None:
    """JSON to a temp file, then renamed: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)


def print0(*args, dist: Ranked | None = None, **kwargs) -> None:
    """print, flushed, on the master process only (every process without dist)."""
    if dist is None or dist.master:
        print(*args, **kwargs, flush=True)
