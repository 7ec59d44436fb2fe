"""One process or many: torchrun's environment, the process group (nccl on GPUs, gloo on the CPU) with a
bounded wait for the other processes, the collectives the training loop needs, whether every node sees one
output folder, a clean teardown, and the CPU allocator setting for training."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from babyllama.common import pick_device
from babyllama.errors import UsageError


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


def setup_distributed(device: str = "auto", timeout_min: float = 10.0) -> Dist:
    """A plain process, or one of many (RANK/WORLD_SIZE/LOCAL_RANK in the environment, as torchrun or a
    cluster's launcher sets them, with MASTER_ADDR/MASTER_PORT): nccl on CUDA, gloo on the CPU. Joining
    the group and every collective after it wait at most timeout_min for the other processes. On the CPU
    freed memory is kept for reuse (keep_freed_memory)."""
    device = pick_device(device)
    if device == "cpu":
        keep_freed_memory()
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    with lost_processes(rank, world, timeout_min):
        torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                      timeout=datetime.timedelta(minutes=timeout_min))
    return Dist(rank, local, world, device)


@contextlib.contextmanager
def lost_processes(rank: int, world_size: int, timeout_min: float) -> Iterator[None]:
    """Another process that never arrives, cannot be reached, dies or hangs makes PyTorch raise one of
    its DistErrors, or a RuntimeError from inside the backend when it happens in DDP's backward pass
    (both multi-line, from deep inside the backend): said here in one line, with where to look, as a
    UsageError."""
    try:
        yield
    except (torch_dist.DistError, RuntimeError) as e:
        if world_size == 1 or not (isinstance(e, torch_dist.DistError) or
                                   re.search(r"gloo|NCCL|ProcessGroup", str(e))):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # the backend's source file and line
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UsageError(f"rank {rank} of {world_size}: lost the other processes ({first}); check that every "
                         f"node was started and reaches {where}, and the other ranks' own output "
                         f"(--dist_timeout_min={timeout_min:g} bounds the wait)") from None


def sees_one_folder(path: str, dist: Dist) -> bool:
    """Whether every process sees the same folder at path (one filesystem that all nodes share, or a
    single node): rank 0 leaves a file of a random name there and every process looks for it."""
    if not dist.enabled:
        return True
    os.makedirs(path, exist_ok=True)
    token = int(all_reduce_sum(secrets.randbits(48) if dist.master else 0, dist))  # exact in float64
    probe = os.path.join(path, f".shared-probe-{token:012x}")
    if dist.master:
        open(probe, "w").close()
    torch_dist.barrier()
    seen = all_reduce_sum(float(os.path.exists(probe)), dist)  # also the barrier before the removal
    if dist.master:
        os.remove(probe)
    return seen == dist.world_size


def broadcast_from_master(value: object, dist: Dist) -> object:
    """Rank 0's value (any picklable object) on every rank."""
    if not dist.enabled:
        return value
    box = [value if dist.master else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(dist: Dist, meet: bool = True) -> None:
    """All ranks meet (unless meet is False: after a failure) before the group goes, with the DDP
    wrappers already collected (they hold reference cycles): otherwise gloo runs may abort at exit
    ("terminate called without an active exception")."""
    if dist.enabled and torch_dist.is_initialized():
        gc.collect()
        if meet:
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
