"""What the entry points share: the choice of device, printing on the first process only, optional
packages imported when asked, writing files safely (temp files renamed into place, removed when a run
fails or on the next run after a kill)."""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
from types import ModuleType
from typing import Any, Protocol

import torch

from babyllama.errors import UsageError


class Ranked(Protocol):
    master: bool  # the first process (distributed.Dist is one)


def require(module: str, asked_by: str, package: str = "", also: str = "") -> ModuleType:
    """An optional package's module, imported because a setting (asked_by) needs it, or a one-line error
    naming the package to install (package: its name on PyPI when it differs from the module's; also:
    where related packages are listed)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split(".")[0]
        raise UsageError(f"{asked_by} needs the {package} package: pip install {package}"
                         + (f" ({also})" if also else "")) from None


def mps_available() -> bool:
    """An Apple GPU that PyTorch can use (Metal Performance Shaders)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(device: str = "auto", *, cuda: bool | None = None, mps: bool | None = None) -> str:
    """'auto' is the first of cuda, mps (Apple GPUs), cpu that this machine has; anything else is
    returned as given, or UsageError when this machine does not have it. cuda and mps override what is
    detected (for tests)."""
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    has_mps = mps_available() if mps is None else mps
    if device == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if (device.startswith("cuda") and not has_cuda) or (device == "mps" and not has_mps):
        build = "" if torch.version.cuda or not device.startswith("cuda") else ", a build without CUDA"
        raise UsageError(f"--device={device}: PyTorch {torch.__version__}{build} finds no such device on this "
                         "machine; --device=auto picks what it has")
    if device.startswith("cuda:") and cuda is None and int(device[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         "numbered from 0")
    return device


def read_text(path: str) -> str:
    """The text of a UTF-8 file (without the byte-order mark a Windows editor may write; line ends as
    they are, for csv), or UsageError naming the file and what to do when it is not UTF-8 text."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if looks_binary(e):
            raise UsageError(f"{path}: not text but binary data (byte {e.start}); UTF-8 text is expected") from None
        source = "utf-16" if e.object[:2] in UTF16_BOMS else "gb18030"
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {likely_encoding(e)}: save it as "
                         f"UTF-8 (iconv -f {source} -t utf-8 {os.path.basename(path)} > new_file, or the editor's "
                         "'save as UTF-8')") from None


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def likely_encoding(e: UnicodeDecodeError) -> str:
    """What text that is not UTF-8 probably is, for the error."""
    if e.object[:2] in UTF16_BOMS:
        return "it starts as UTF-16 text does"
    return "Chinese text from Windows is often GB18030"


def looks_binary(e: UnicodeDecodeError) -> bool:
    """Whether the bytes that failed to decode are binary data rather than text in another encoding:
    text of any encoding has almost no control bytes besides tabs and line ends, binary data has many."""
    if e.object[:2] in UTF16_BOMS:
        return False
    sample = e.object[max(0, e.start - 2048):e.start + 2048]
    control = sum(1 for b in sample if b < 32 and b not in b"\t\n\r\f")
    return b"\0" in sample or control > len(sample) // 20


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

