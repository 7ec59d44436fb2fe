"""Which dtype a run computes in, and how fast the device multiplies matrices: the dtype `auto` chooses
per device (on a CPU by timing bfloat16 against float32), autocast, and the matmul peak for MFU."""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_cpu_dtype(capability: str, float32_flops: float, bfloat16_flops: float) -> tuple[str, str]:
    """bfloat16 autocast only where this CPU multiplies bfloat16 matrices clearly faster than float32
    (native bf16 instructions); without them a bfloat16 matmul is emulated and many times slower.
    Returns (dtype, the reason, for the log)."""
    ratio = bfloat16_flops / float32_flops
    if ratio >= 1.2:
        return "bfloat16", f"cpu {capability}, bfloat16 (bfloat16 matmul {ratio:.1f}x float32 here)"
    slower = f"{1 / ratio:.0f}x slower" if ratio < 0.5 else "no faster"
    return "float32", f"cpu {capability}, float32 (bfloat16 matmul {slower} here)"


PROBE_ROUNDS = 3


@functools.cache
def cpu_matmul_probe() -> tuple[float, float]:
    """FLOP/s of a 256x256 matmul in float32 and in bfloat16 on this CPU, each the best of a few rounds
    taken in turn (about a tenth of a second): other work on the machine only slows a round down, and
    taking turns keeps a busy moment from falling on one dtype alone, where it could make a CPU with
    native bf16 train a whole run in float32's slower steps."""
    rounds = [(matmul_flops("cpu", "float32", 0.015, n=256), matmul_flops("cpu", "bfloat16", 0.015, n=256))
              for _ in range(PROBE_ROUNDS)]
    return max(f32 for f32, _ in rounds), max(bf16 for _, bf16 in rounds)


def resolve_dtype(dtype: str, device: str, cpu_probe: Callable[[], tuple[float, float]] = cpu_matmul_probe,
                  bf16_on_mps: bool | None = None) -> tuple[str, str]:
    """The training dtype for `dtype` on `device`, and why (one line for the log). 'auto' is bfloat16
    on CUDA where supported, else float16 (with loss scaling); on Apple GPUs bfloat16 where the OS
    has it (macOS 14), else float16; on a CPU whichever of bfloat16 and float32 multiplies faster here
    (cpu_probe, measured once)."""
    kind = device.split(":")[0]
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
        reason = f"{kind}, {dtype} as asked"
        if kind == "cpu" and dtype != "float32":
            auto, why = choose_cpu_dtype(torch.backends.cpu.get_cpu_capability(), *cpu_probe())
            if auto == "float32":
                reason += f"; --dtype=auto would choose {why.split(', ', 1)[1]}"
        return dtype, reason
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "cuda, bfloat16"
        return "float16", "cuda, float16 with loss scaling (no bfloat16 on this GPU)"
    if kind == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0) if bf16_on_mps is None else bf16_on_mps:
            return "bfloat16", "mps, bfloat16"
        return "float16", "mps, float16 with loss scaling (bfloat16 needs macOS 14)"
    if kind == "cpu":
        return choose_cpu_dtype(torch.backends.cpu.get_cpu_capability(), *cpu_probe())
    return "float32", f"{kind}, float32"


def autocast(device: str, dtype: str):
    """Mixed precision for the forward pass in the dtype asked for (the seed always used float16)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timings of asynchronous GPU work need it)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def matmul_flops(device: str, dtype: str, seconds: float = 1.0, n: int | None = None) -> float:
    """FLOP/s of repeated n x n matmuls in dtype on this device, over about `seconds`."""
    n = n or (2048 if device == "cpu" else 8192)
    torch_dtype = DTYPES[dtype]
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def measure_peak_flops(device: str, dtype: str, seconds: float = 1.0) -> float:
    """The peak that MFU is reported against: the matmul FLOP/s of the dtype the run computes in, or
    of float32 where that is higher (under autocast some work stays in float32, so a slower dtype's
    peak would let MFU pass 100%)."""
    peak = matmul_flops(device, dtype, seconds)
    if dtype != "float32":
        peak = max(peak, matmul_flops(device, "float32", seconds))
    return peak
