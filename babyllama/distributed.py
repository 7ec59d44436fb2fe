"""One process or many: torchrun's environment, the process group (nccl on GPUs, gloo on the CPU), the
collectives the training loop needs, a clean teardown, and the CPU allocator setting for training."""
from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from babyllama.common import pick_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse. A training step frees and allocates the same
    large tensors every time; by default glibc maps each large one afresh and gives it back when it
    is freed, so every step pays page faults on all of them. Kept, CPU training steps run faster
    (BENCHMARKS.md); the process keeps its peak memory until it ends.
    False where the C library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, most = -1, -3, 2**31 - 1  # mallopt takes C ints
    return bool(mallopt(m_mmap_threshold, most)) and bool(mallopt(m_trim_threshold, most))


def setup_distributed(device: str = "auto") -> Dist:
    """A plain process, or one of torchrun's (RANK/WORLD_SIZE/LOCAL_RANK in the environment):
    nccl on CUDA, gloo on the CPU. On the CPU freed memory is kept for reuse (keep_freed_memory)."""
    device = pick_device(device)
    if device == "cpu":
        keep_freed_memory()
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local, world, device)


def teardown(dist: Dist) -> None:
    """All ranks meet before the group goes, with the DDP wrappers already collected (they hold
    reference cycles): otherwise gloo runs may abort at exit ("terminate called without an active
    exception")."""
    if dist.enabled and torch_dist.is_initialized():
        gc.collect()
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _all_reduce(value: float | torch.Tensor, dist: Dist, op: torch_dist.ReduceOp) -> float:
    """One number combined over the processes (itself when there is one process)."""
    if not dist.enabled:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t, op=op)
    return float(t)


def all_reduce_mean(value: float | torch.Tensor, dist: Dist) -> float:
    return _all_reduce(value, dist, torch_dist.ReduceOp.SUM) / dist.world_size


def all_reduce_max(value: float, dist: Dist) -> float:
    return _all_reduce(value, dist, torch_dist.ReduceOp.MAX)


def all_reduce_sum(value: float, dist: Dist) -> float:
    return _all_reduce(value, dist, torch_dist.ReduceOp.SUM)
