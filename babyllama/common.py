"""What the entry points share: the choice of device, printing on the first process only, writing
files safely (temp files renamed into place, removed when a run fails or on the next run after a kill)."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Protocol

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


class PendingFiles:
    """Output files written under NAME.tmp: commit() renames them all into place; an error inside a
    `with` block (or discard()) removes them, so a failed run leaves neither half-written outputs nor
    temp files."""

    def __init__(self, paths: list[str], mode: str = "wb", **open_kwargs: Any):
        self.paths = paths
        self.files = {path: open(path + ".tmp", mode, **open_kwargs) for path in paths}

    def commit(self) -> None:
        for path, f in self.files.items():
            f.close()
            os.replace(f.name, path)

    def discard(self) -> None:
        for f in self.files.values():
            f.close()
            if os.path.exists(f.name):
                os.remove(f.name)

    def __enter__(self) -> PendingFiles:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str, outputs: list[str]) -> list[str]:
    """Remove what a killed run of ours left beside its outputs in folder (outputs: glob patterns of
    file names): NAME.tmp, NAME.link, and NAME.tmpPID when process PID has ended. Returns the paths."""
    removed = []
    for pattern in outputs:
        for path in glob.glob(os.path.join(glob.escape(folder), pattern + ".*")):
            suffix = re.search(r"\.(tmp|link)(\d*)$", path)
            if suffix and not (suffix[2] and _pid_alive(int(suffix[2]))) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return sorted(removed)

