"""What the training stages share: distributed set-up, autocast and loss scaling, the LR schedule,
the optimizer, one optimizer step with gradient accumulation, checkpoints, metrics and clean exits.

A stage script builds its model and data, then writes its loop with these pieces:

    dist = setup_distributed(cfg.device)
    trainer = Trainer(model, TrainerSettings(...), dist)
    state = trainer.resume(out_dir)                  # {} on a fresh run
    while trainer.step < max_steps:
        stats = trainer.train_step(micro_batches, loss_fn)
        ...log, evaluate, trainer.save(out_dir, extra)...
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import glob
import json
import math
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import pick_device, print0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------ distributed set-up

def stage_start_time() -> float:
    """When this process started (time.time() scale), so that a time budget includes the imports; now
    where /proc cannot tell (not Linux) or the process is older than a minute (a notebook, a test
    session: the stage did not begin with it)."""
    now = time.time()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return now
    return started if 0 <= now - started <= 60 else now


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    started: float = field(default_factory=stage_start_time)  # time budgets count from here

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse. A training step frees and allocates the same
    large tensors every time; by default glibc maps each large one afresh and gives it back when it
    is freed, so every step pays page faults on all of them. Kept, a compiled bf16 step of `tiny` on
    2 CPU cores runs about 30% faster (BENCHMARKS.md); the process keeps its peak memory until it ends.
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


def all_reduce_mean(value: float | torch.Tensor, dist: Dist) -> float:
    if not dist.enabled:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return float(t) / dist.world_size


# ------------------------------------------------------------------ precision, schedule, optimizer

def choose_cpu_dtype(capability: str, float32_flops: float, bfloat16_flops: float) -> tuple[str, str]:
    """bfloat16 autocast only where this CPU multiplies bfloat16 matrices clearly faster than float32
    (native bf16 instructions); without them a bfloat16 matmul is emulated and many times slower.
    Returns (dtype, the reason, for the log)."""
    ratio = bfloat16_flops / float32_flops
    if ratio >= 1.2:
        return "bfloat16", f"cpu {capability}, bfloat16 (bfloat16 matmul {ratio:.1f}x float32 here)"
    slower = f"{1 / ratio:.0f}x slower" if ratio < 0.5 else "no faster"
    return "float32", f"cpu {capability}, float32 (bfloat16 matmul {slower} here)"


@functools.cache
def cpu_matmul_probe() -> tuple[float, float]:
    """FLOP/s of a 256x256 matmul in float32 and in bfloat16 on this CPU (about a tenth of a second)."""
    return matmul_flops("cpu", "float32", 0.04, n=256), matmul_flops("cpu", "bfloat16", 0.04, n=256)


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


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over warmup_steps optimizer steps, then cosine decay that reaches min_lr at the
    last step (max_steps - 1)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps - 1:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: str) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases do not; the fused kernel on CUDA and CPU (on CPU an
    optimizer step of baby_92m takes 16 ms fused against 124 ms with the default foreach kernels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:  # the tied embedding appears once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


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


# ------------------------------------------------------------------ RNG state (exact resume)

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ checkpoints

def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temp file, then rename: a crash mid-write never replaces a good file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir: str, state: dict, step: int, keep_last: int) -> str:
    """Write ckpt_<step>.pt, point ckpt.pt at it (a hard link, renamed into place) and keep only the
    newest keep_last numbered files. Returns the path of ckpt.pt."""
    os.makedirs(out_dir, exist_ok=True)
    numbered = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    save_atomic(state, numbered)
    latest = os.path.join(out_dir, "ckpt.pt")
    link_tmp = latest + ".link"
    if os.path.exists(link_tmp):
        os.remove(link_tmp)
    try:
        os.link(numbered, link_tmp)
    except OSError:  # file systems without hard links: a second write
        save_atomic(state, link_tmp)
    os.replace(link_tmp, latest)
    for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-keep_last or None]:
        os.remove(old)
    return latest


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and a console line, on the master rank only."""

    def __init__(self, out_dir: str, dist: Dist, resume_step: int | None = None):
        self.dist = dist
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if dist.master:
            os.makedirs(out_dir, exist_ok=True)
            self._truncate(resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be run again); on a fresh
        run, start an empty file."""
        if resume_step is None or not os.path.exists(self.path):
            open(self.path, "w").close()
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record: dict) -> None:
        if not self.dist.master:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ the settings every stage shares

@dataclass
class TrainConfig:
    """The settings every training stage has. A stage's Config inherits them (and may give other
    defaults) and adds its own data and model settings."""
    out_dir: str = "out/run"  # ckpt.pt, metrics.jsonl
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # optimizer steps (the LR schedule counts these); 0: from epochs where a stage has them
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # optimizer steps of linear warmup
    weight_decay: float = 0.0  # AdamW weight decay of the matrices (never of norms and biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    device: str = "auto"  # auto, cpu, cuda, cuda:1...
    dtype: str = "auto"  # auto (bfloat16 where supported), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model (costs 25-35 s at start on a CPU)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) across processes
    seed: int = 1337
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 200  # steps between validations
    save_interval: int = 500  # steps between checkpoints
    keep_last: int = 2  # numbered checkpoints kept besides ckpt.pt
    time_limit_min: float = 0.0  # stop (and save) after this many minutes; 0 for no limit
    time_budget_min: float = 0.0  # fit the steps (at most max_steps) into this many minutes of the whole stage; 0: off
    peak_tflops: float = 0.0  # the device's peak for MFU; 0 measures a matmul at start
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists
    max_nonfinite_in_a_row: int = 10  # stop the run after this many non-finite losses in a row


def run_stage(config_cls: type, train: Callable[[Any, Dist], None], argv: list[str] | None, doc: str | None) -> None:
    """A training script's main(): settings, distributed set-up, the stage, one-line errors, teardown."""
    from configurator import parse_config
    cfg = parse_config(config_cls, argv, doc)
    dist = setup_distributed(cfg.device)
    try:
        train(cfg, dist)
    except (FileNotFoundError, FileExistsError, ValueError, TrainingDiverged) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        teardown(dist)


# ------------------------------------------------------------------ the optimizer step

class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainerSettings:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False
    max_nonfinite_in_a_row: int = 10

    @classmethod
    def from_config(cls, cfg: Any) -> TrainerSettings:
        """The settings of a stage's config that have these names (every stage uses the same ones)."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__ if hasattr(cfg, f)})


@dataclass
class StepStats:
    loss: float  # mean over micro-batches and ranks; nan when skipped
    lr: float
    grad_norm: float
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)  # what loss_fn reported, averaged the same way


class Trainer:
    """Wraps the model for DDP/FSDP/compile and performs optimizer steps with gradient accumulation."""

    def __init__(self, model: torch.nn.Module, settings: TrainerSettings, dist: Dist):
        self.settings, self.dist = settings, dist
        self.dtype, self.precision = resolve_dtype(settings.dtype, dist.device)
        self.raw_model = model.to(dist.device)
        self.model = self._wrap(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model, settings.lr, settings.weight_decay,
                                        (settings.beta1, settings.beta2), dist.device)
        # A loss scaler only for float16: bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(dist.device.split(":")[0], enabled=self.dtype == "float16")
        self.step = 0
        self.nonfinite_total = 0
        self.fitted_to_budget = False  # max_steps and warmup_steps were fitted to a time budget
        self.nonfinite_in_a_row = 0

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode without gradients for validation, then back to training. Under FSDP the root
        module keeps its parameters unsharded after a forward without backward; they are resharded
        here, or the optimizer would no longer find them when the next checkpoint is written."""
        self.raw_model.eval()
        try:
            with torch.no_grad():
                yield self.raw_model
        finally:
            self.raw_model.train()
            if self.settings.fsdp:
                self.raw_model.reshard()

    def release(self) -> None:
        """Drop the distributed wrapper; call before teardown()."""
        self.model = self.raw_model

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.settings.fsdp:
            if not torch_dist.is_initialized():
                raise ValueError("fsdp needs a process group: launch with torchrun")
            from torch.distributed.fsdp import fully_shard
            for block in [m for m in model.modules() if type(m).__name__ == "TransformerBlock"]:
                fully_shard(block)  # one unit per block, so that only one block is gathered at a time
            fully_shard(model)
        if self.settings.compile:
            model = torch.compile(model)
        if torch_dist.is_initialized() and not self.settings.fsdp:  # under torchrun, one process too
            device_ids = [self.dist.local_rank] if self.dist.device.startswith("cuda") else None
            model = DDP(model, device_ids=device_ids)
        return model

    def _sync_context(self, last: bool):
        """Gradients are all-reduced on the last micro-step only (the seed synced on none of them)."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.settings.fsdp:
            self.raw_model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self, micro_batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], Any]) -> StepStats:
        """One optimizer step over the micro-batches (gradient accumulation); loss_fn(model, batch)
        returns the mean loss of one micro-batch, or (loss, {name: float}) with metrics to log."""
        s = self.settings
        lr = cosine_lr(self.step, s.lr, s.min_lr, s.warmup_steps, s.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = list(micro_batches)
        total, finite, metrics = 0.0, True, {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.settings.fsdp and last:
                self.raw_model.set_requires_gradient_sync(True)
            with self._sync_context(last):
                with autocast(self.dist.device, self.dtype):
                    out = loss_fn(self.model, batch)
                    loss, reported = out if isinstance(out, tuple) else (out, {})
                    loss = loss / len(micro_batches)
                finite &= bool(torch.isfinite(loss))
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
            for name, value in reported.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / len(micro_batches)
        finite = all_reduce_mean(float(finite), self.dist) == 1.0
        if not finite:
            return self._skip(lr)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), s.grad_clip if s.grad_clip > 0 else 1e30)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.nonfinite_in_a_row = 0
        metrics = {name: all_reduce_mean(value, self.dist) for name, value in sorted(metrics.items())}
        return StepStats(all_reduce_mean(total, self.dist), lr, float(norm), False, metrics)

    def _skip(self, lr: float) -> StepStats:
        """A non-finite loss: drop the gradients, keep the weights, count it; many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.settings.max_nonfinite_in_a_row:
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step}: the run diverged. "
                "Lower the learning rate, use bfloat16 instead of float16, or resume from an earlier checkpoint")
        return StepStats(float("nan"), lr, float("nan"), True)

    # -------------------------------------------------------------- state

    def model_state(self) -> dict:
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def state_dict(self) -> dict:
        """Everything an exact resume needs. It references live tensors: save it before the next step."""
        optimizer = self.optimizer.state_dict()
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            optimizer = get_optimizer_state_dict(self.raw_model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": self.model_state(), "optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "step": self.step, "nonfinite_total": self.nonfinite_total, "rng": rng_state(),
                "schedule": {"max_steps": self.settings.max_steps, "warmup_steps": self.settings.warmup_steps,
                             "fitted_to_budget": self.fitted_to_budget}}

    def resume(self, out_dir: str, allowed: bool, expect: dict) -> dict | None:
        """Load out_dir/ckpt.pt when it exists (None when it does not): refuse it unless allowed, or when
        its entries differ from expect (model_args, LoRA settings). Returns the checkpoint for the
        stage's own state (data position)."""
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(path):
            return None
        if not allowed:
            raise FileExistsError(f"{path} exists; pass --resume=true to continue that run or choose another "
                                  "--out_dir")
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, value in expect.items():
            if state.get(key) != value:
                raise ValueError(f"{path} was made with other {key}: {state.get(key)} (this run: {value})")
        self.load_state_dict(state)
        print0(f"resumed from {path} at step {self.step}", dist=self.dist)
        return state

    def load_state_dict(self, state: dict) -> None:
        from model import clean_state_dict
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw_model, clean_state_dict(state["model"]), options=options)
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=options)
        else:
            self.raw_model.load_state_dict(clean_state_dict(state["model"]), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        set_rng_state(state["rng"])


# ------------------------------------------------------------------ the loop every stage runs

@dataclass
class LoopSettings:
    out_dir: str
    log_interval: int = 10
    eval_interval: int = 200
    save_interval: int = 500
    keep_last: int = 2
    time_limit_min: float = 0.0
    time_budget_min: float = 0.0
    peak_flops: float = 1.0  # FLOP/s of one device, for MFU
    flops_per_token: float = 0.0  # training FLOPs per token of the model

    @classmethod
    def from_config(cls, cfg: TrainConfig, peak_flops: float, flops_per_token: float) -> LoopSettings:
        return cls(cfg.out_dir, cfg.log_interval, cfg.eval_interval, cfg.save_interval, cfg.keep_last,
                   cfg.time_limit_min, cfg.time_budget_min, peak_flops, flops_per_token)


@dataclass
class Run:
    """What a stage needs to start its loop: the trainer, its data order, loop settings, and where a
    resumed run left off (state is the checkpoint, None on a fresh run)."""
    trainer: Trainer
    order: Any  # dataset.WindowOrder over the stage's items (windows, samples, pairs, prompts)
    loop: LoopSettings
    tokens_seen: int
    state: dict | None


def start_run(cfg: TrainConfig, model: torch.nn.Module, dist: Dist, n_items: int, items_per_step: int,
              flops_per_token: float, expect: dict) -> Run:
    """The common start of every stage: a rank-sharded order over n_items, the number of steps
    (cfg.max_steps, or cfg.epochs passes over the items), the trainer, a resume from out_dir/ckpt.pt
    when there is one (expect: what it must match), and the loop settings with the device's peak."""
    from dataset import WindowOrder
    order = WindowOrder(n_items, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = max(1, n_items // (items_per_step * cfg.grad_accum * dist.world_size))
    settings = TrainerSettings.from_config(cfg)
    settings.max_steps = cfg.max_steps or math.ceil(getattr(cfg, "epochs", 1.0) * steps_per_epoch)
    trainer = Trainer(model, settings, dist)
    state = trainer.resume(cfg.out_dir, cfg.resume, expect)
    tokens_seen = 0
    if state is not None:
        order.load_state_dict(state["data"])
        tokens_seen = state["tokens_seen"]
        schedule = state.get("schedule", {})
        if cfg.time_budget_min > 0 and schedule.get("fitted_to_budget"):  # keep the steps fitted before
            settings.max_steps, settings.warmup_steps = schedule["max_steps"], schedule["warmup_steps"]
            trainer.fitted_to_budget = True
    peak = cfg.peak_tflops * 1e12 or measure_peak_flops(dist.device, trainer.dtype)
    loop = LoopSettings.from_config(cfg, peak, flops_per_token)
    steps = f"{settings.max_steps} steps"
    if cfg.time_budget_min > 0 and not trainer.fitted_to_budget:
        steps = f"at most {steps}, as many as fit in {cfg.time_budget_min:g} min"
    print0(f"{steps} ({settings.max_steps / steps_per_epoch:.2f} passes over {n_items:,} items); "
           f"{dist.world_size} process(es) on {dist.device}; {trainer.precision}", dist=dist)
    return Run(trainer, order, loop, tokens_seen, state)


def validation_loss(trainer: Trainer, n_items: int, batch_of: Callable[[list[int]], tuple], batches: int,
                    batch_size: int, shuffle: bool = True) -> float:
    """Mean loss of the model over the same validation items every time: a fixed selection (shuffled
    with seed 0, or the first ones) of batches x batch_size items, shared between the ranks."""
    from dataset import WindowOrder
    dist = trainer.dist
    order = WindowOrder(n_items, seed=0, rank=dist.rank, world_size=dist.world_size, shuffle=shuffle)
    n = min(batches * batch_size, order.per_rank)
    losses = []
    with trainer.evaluating() as model:
        for start in range(0, n, batch_size):
            x, y = batch_of(order.next(min(batch_size, n - start)))
            with autocast(dist.device, trainer.dtype):
                losses.append(float(model(x.to(dist.device), y.to(dist.device))[1]))
    return all_reduce_mean(sum(losses) / len(losses), dist)


def steps_that_fit(seconds: float, step: int, step_s: float, eval_s: float, eval_interval: int, save_s: float,
                   save_interval: int) -> int:
    """The most optimizer steps after `step` that fit in `seconds`, counting the validations and
    checkpoints they trigger (every eval_interval and save_interval steps) and the final ones."""
    def cost(n: int) -> float:
        end = step + n
        evals = end // eval_interval - step // eval_interval + 1
        saves = end // save_interval - step // save_interval + 1
        return n * step_s + evals * eval_s + saves * save_s

    lo, hi = 0, max(1, int(seconds / step_s) + 1)  # the steps alone overrun at hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    return lo


def all_reduce_max(value: float, dist: Dist) -> float:
    if not dist.enabled:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return float(t)


class TimeBudget:
    """Fits a stage's optimizer steps into time_budget_min minutes counted from the stage's start
    (dist.started). The steps after the first (which pays for compilation) are timed until there are
    enough; one validation and one checkpoint are timed; then max_steps becomes what fits, at most the
    configured max_steps, and the warmup shrinks with it, so the schedule reaches min_lr on its last
    step. The timing goes on, over the most recent steps: the schedule is shortened whenever the steps
    left no longer fit (the machine slowed down), and lengthened, up to the configured max_steps, when
    clearly more fit and most of the schedule is still ahead (a slow spell during the first timing)."""

    MIN_TIMED_STEPS = 5
    RECENT_STEPS = 50  # the speed that later adjustments go by
    LENGTHEN_BY = 1.05  # lengthen only for at least this many more steps...
    LENGTHEN_BEFORE = 0.8  # ...and only before this share of the schedule is done

    def __init__(self, trainer: Trainer, loop: LoopSettings):
        self.trainer, self.loop = trainer, loop
        self.on = loop.time_budget_min > 0
        self.seconds = loop.time_budget_min * 60
        self.deadline = trainer.dist.started + self.seconds
        self.margin = 2.0 + 0.05 * self.seconds  # what the estimate cannot see: the exit, slower steps
        self.pending = self.on and not trainer.fitted_to_budget
        self.adjusting = self.pending  # a resumed run keeps the schedule it was fitted to
        self.cap = trainer.settings.max_steps  # the configured max_steps
        self.first_step = trainer.step + 1
        self.timed_s, self.timed_steps = 0.0, 0
        self.recent: deque[float] = deque(maxlen=self.RECENT_STEPS)
        self.eval_s = self.save_s = 0.0

    def add_step(self, step: int, seconds: float) -> None:
        if self.on and step > self.first_step:
            self.timed_s += seconds
            self.timed_steps += 1
            self.recent.append(seconds)

    def ready(self) -> bool:
        """Enough steps are timed to fit the schedule."""
        enough_s = min(60.0, 0.1 * self.seconds)
        return self.pending and self.timed_steps >= self.MIN_TIMED_STEPS and self.timed_s >= enough_s

    def stop_at(self) -> float:
        """When to stop at the latest, leaving time for the last checkpoint; inf without a budget."""
        return self.deadline - self.save_s - 1.0 if self.on else math.inf

    def _steps_left(self, step_s: float, margin: float) -> int:
        left = all_reduce_max(self.deadline - time.time(), self.trainer.dist)
        return steps_that_fit(left - margin, self.trainer.step, step_s, self.eval_s, self.loop.eval_interval,
                              self.save_s, self.loop.save_interval)

    def fit(self, eval_s: float, save_s: float) -> str:
        """Set max_steps and warmup_steps from the timings; returns the line that says so."""
        trainer, dist, s = self.trainer, self.trainer.dist, self.trainer.settings
        self.eval_s, self.save_s = all_reduce_max(eval_s, dist), all_reduce_max(save_s, dist)
        step_s = all_reduce_max(self.timed_s / self.timed_steps, dist)
        n = self._steps_left(step_s, self.margin)
        s.max_steps = max(trainer.step + 1, min(self.cap, trainer.step + n))
        # The warmup shrinks with the schedule, but need not go below a tenth of it.
        s.warmup_steps = min(s.warmup_steps, max(1, round(s.warmup_steps * s.max_steps / self.cap),
                                                 s.max_steps // 10))
        trainer.fitted_to_budget, self.pending = True, False
        return (f"time budget {self.loop.time_budget_min:g} min: {step_s:.3f} s a step, validation "
                f"{self.eval_s:.1f} s, checkpoint {self.save_s:.1f} s, {self.deadline - time.time():.0f} s left -> "
                f"{s.max_steps} steps (of at most {self.cap}), warmup {s.warmup_steps}")

    def adjust_to_speed(self) -> str | None:
        """After the fit: end the schedule earlier if the steps left no longer fit at the recent speed,
        or later if clearly more fit. Returns the line that says so, or None. Every rank calls it on
        the same steps."""
        if not self.adjusting or self.pending or not self.recent:
            return None
        trainer, s = self.trainer, self.trainer.settings
        step_s = all_reduce_max(sum(self.recent) / len(self.recent), trainer.dist)
        fits = trainer.step + self._steps_left(step_s, self.margin / 2)
        if fits < s.max_steps:
            s.max_steps = max(trainer.step + 1, fits)
        elif trainer.step < self.LENGTHEN_BEFORE * s.max_steps and s.max_steps < self.cap:
            fits = min(self.cap, trainer.step + self._steps_left(step_s, self.margin))
            if fits < self.LENGTHEN_BY * s.max_steps:
                return None
            s.max_steps = fits
        else:
            return None
        return f"time budget: steps take {step_s:.3f} s now, the schedule ends at step {s.max_steps}"


def fit(trainer: Trainer, loop: LoopSettings, next_batches: Callable[[], tuple[list[Any], int]],
        loss_fn: Callable[[torch.nn.Module, Any], Any],
        evaluate: Callable[[], dict[str, float]] | None = None,
        extra_state: Callable[[], dict] | None = None, tokens_seen: int = 0) -> None:
    """Train until trainer.settings.max_steps optimizer steps (fitted to loop.time_budget_min when set):
    next_batches() gives the micro-batches of one step and the number of tokens they hold on this rank;
    evaluate() gives validation metrics; extra_state() what a checkpoint holds beyond the trainer's
    state (model args, data position, config). Logs to metrics.jsonl, checkpoints every save_interval
    steps, at the end, at the time limit and on SIGINT/SIGTERM. The caller has resumed the trainer
    (and passes the tokens seen so far)."""
    dist, settings = trainer.dist, trainer.settings
    log = MetricsLog(loop.out_dir, dist, resume_step=trainer.step if trainer.step else None)
    budget = TimeBudget(trainer, loop)
    start_time = last_time = time.time()
    time_limit = start_time + 60 * loop.time_limit_min if loop.time_limit_min > 0 else math.inf
    last_tokens, last_step = tokens_seen, trainer.step

    def save() -> float:
        began = time.time()
        state = trainer.state_dict()
        state.update(tokens_seen=tokens_seen, **(extra_state() if extra_state else {}))
        if dist.master:
            save_checkpoint(loop.out_dir, state, trainer.step, loop.keep_last)
        return time.time() - began

    with StopSignal() as stop:
        while trainer.step < settings.max_steps:
            began = time.time()
            batches, n_tokens = next_batches()
            stats = trainer.train_step(batches, loss_fn)
            tokens_seen += int(all_reduce_mean(n_tokens, dist) * dist.world_size)
            step = trainer.step
            budget.add_step(step, time.time() - began)
            fit_now = budget.ready() and not stats.skipped
            record = {"step": step, "tokens": tokens_seen, "loss": stats.loss, "lr": stats.lr,
                      "grad_norm": stats.grad_norm, **stats.metrics}
            if stats.skipped:
                record["skipped_nonfinite"] = trainer.nonfinite_total
                print0(f"step {step}: non-finite loss, step skipped ({trainer.nonfinite_total} so far)", dist=dist)
            if step % loop.log_interval == 0 and (note := budget.adjust_to_speed()):
                print0(note, dist=dist)
            done = step >= settings.max_steps
            stop_at = min(time_limit, budget.stop_at())
            over_time = stop_at < math.inf and all_reduce_max(float(time.time() > stop_at), dist) > 0
            console = None
            if step % loop.log_interval == 0 or step % loop.eval_interval == 0 or done or over_time or fit_now:
                now = time.time()
                speed = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
                mfu = speed * loop.flops_per_token / (loop.peak_flops * dist.world_size)
                record.update(tokens_per_s=speed, mfu=mfu)
                eta = (settings.max_steps - step) * (now - last_time) / max(step - last_step, 1)
                console = (f"step {step}/{settings.max_steps} loss {stats.loss:.4f} lr {stats.lr:.2e} "
                           f"{speed:,.0f} tok/s MFU {100 * record['mfu']:.1f}% ETA {eta / 60:.1f} min"
                           + "".join(f" {k} {v:.3f}" for k, v in stats.metrics.items()))
            eval_s = 0.0
            if evaluate is not None and not stats.skipped and (
                    step % loop.eval_interval == 0 or done or over_time or fit_now):
                began = time.time()
                metrics = evaluate()
                eval_s = time.time() - began
                record.update(metrics)
                console += " | " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            if console is not None:
                print0(console, dist=dist)
                last_time, last_tokens, last_step = time.time(), tokens_seen, step  # speed excludes evaluation
            log.log(record)
            if step % loop.save_interval == 0 or done or stop.requested or over_time or fit_now:
                save_s = save()
                if fit_now:
                    print0(budget.fit(eval_s, save_s), dist=dist)
                    last_time = time.time()
            if stop.requested or over_time:
                print0(f"stopped at step {step}; rerun the same command to continue", dist=dist)
                break
    trainer.release()
