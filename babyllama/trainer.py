"""What the training stages share: the settings, one optimizer step with gradient accumulation, the
optimizer, checkpoints of the training state, metrics, clean exits and the loop.

A stage's main reads top to bottom:

    with training_stage(Config, argv, __doc__) as (cfg, dist):     # settings, processes, one-line errors
        ...                                                          # the stage's model and data
        training = start_training(cfg, model, dist, n_items, items_per_step, flops_per_token, stage="sft",
                                  tokenizer_sha256=tok.sha256)      # the trainer, the data order; resumes
        train_loop(training, next_batches, loss_fn, evaluate)       # steps, logs, validation, checkpoints

The stage's Config (a TrainConfig subclass) is the one settings object: the trainer reads it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from babyllama.budget import TimeBudget
from babyllama.checkpoint import clean_state_dict, read_checkpoint, save_checkpoint
from babyllama.common import print0, remove_stale_temps
from babyllama.configurator import (
    Device,
    Dtype,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    OutputDir,
    Positive,
    PositiveFloat,
    PositiveFraction,
    TrackerNames,
    one_of,
    parse_config,
)
from babyllama.distributed import (
    Dist,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_from_master,
    lost_processes,
    sees_one_folder,
    setup_distributed,
    teardown,
)
from babyllama.errors import UsageError, one_line_errors
from babyllama.muon import ITERATIONS, MuonAdamW, momentum_at
from babyllama.precision import autocast, measure_peak_flops, resolve_dtype
from babyllama.schedule import Schedule
from babyllama.trackers import Tracker, open_trackers, scalars_of
from model import routing_stats

C = TypeVar("C", bound="TrainConfig")


def is_embedding(name: str) -> bool:
    """The tables a token id indexes (and the output matrix, tied to one or not): AdamW, embedding_lr_scale."""
    return name in ("tok_embeddings.weight", "output.weight", "bigram_embeddings.weight") or name.endswith(
        "value_embedding.weight")


# ------------------------------------------------------------------ the optimizer

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: str, kind: str = "adamw", muon_iterations: str = "jordan",
                   embedding_lr_scale: float = 1.0, muon_dtype: torch.dtype = torch.float32,
                   normuon: bool = False) -> torch.optim.Optimizer:
    """AdamW (the fused kernel on CUDA, CPU and Apple GPUs: on a CPU many times faster than the foreach
    kernels), or with kind="muon" Muon for the blocks' weight matrices (not a router's: its rows are one
    score each, not a map to orthogonalize) and AdamW for the rest (muon.py).
    Matrices decay, norms and biases do not. The groups keep the parameters' order, which checkpoints of
    the optimizer's state rely on. With embedding_lr_scale the embedding and output matrices are a group of
    their own whose rate is the schedule's times that scale (the trainer reads each group's lr_scale).
    muon_dtype: the dtype of Muon's Newton-Schulz matmuls; normuon: NorMuon's rows (muon.normalize_rows)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # a tied embedding once
    embeddings = [p for n, p in named if is_embedding(n)] if embedding_lr_scale != 1 else []
    named = [(n, p) for n, p in named if not any(p is e for e in embeddings)]
    scaled = [{"params": embeddings, "weight_decay": weight_decay, "lr_scale": embedding_lr_scale}][:len(embeddings)]
    matrices, no_decay = [(n, p) for n, p in named if p.dim() >= 2], [p for _, p in named if p.dim() < 2]
    if kind == "muon":
        orthogonalized = [n.startswith("layers.") and not n.endswith("router.weight") and not is_embedding(n)
                          for n, _ in matrices]
        groups = [{"params": [p for (_, p), o in zip(matrices, orthogonalized) if o], "muon": True},
                  {"params": [p for (_, p), o in zip(matrices, orthogonalized) if not o]}]
        groups = [{**g, "weight_decay": weight_decay} for g in groups] + [{"params": no_decay, "weight_decay": 0.0}]
        return MuonAdamW([g for g in groups + scaled if g["params"]], lr=lr, betas=betas, iterations=muon_iterations,
                         ns_dtype=muon_dtype, normalize_rows=normuon)
    groups = [{"params": [p for _, p in matrices], "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}, *scaled]
    fused = torch.device(device).type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


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


# ------------------------------------------------------------------ metrics and signals


class MetricsLog:
    """metrics.jsonl (one JSON object per log step), and the same numbers to the trackers, on the master
    rank only. A context manager: the trackers are closed at its end."""

    def __init__(self, out_dir: str, dist: Dist, resume_step: int | None = None, trackers: list[Tracker] = ()):
        self.dist, self.trackers = dist, list(trackers)
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
        for tracker in self.trackers:
            tracker.log(scalars_of(record), record["step"])

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        for tracker in self.trackers:
            tracker.close()


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
    out_dir: OutputDir = "out/run"  # ckpt.pt, metrics.jsonl
    grad_accum: Positive = 1  # micro-steps per optimizer step
    max_steps: NonNegative = 0  # optimizer steps (the LR schedule counts these); 0: epochs passes over the data
    epochs: PositiveFloat = 1.0  # passes over the data, when max_steps is 0
    lr: PositiveFloat = 3e-4  # peak learning rate
    min_lr: NonNegativeFloat = 3e-5  # learning rate at the end of the decay
    lr_schedule: one_of("cosine", "linear", "wsd") = "cosine"  # the decay after warmup (wsd: flat, then linear)
    decay_share: PositiveFraction = 0.2  # wsd: the share of the steps after warmup spent decaying
    warmup_steps: NonNegative = 20  # optimizer steps of linear warmup
    weight_decay: NonNegativeFloat = 0.0  # decoupled weight decay of the matrices (never of norms and biases)
    optimizer: one_of("adamw", "muon") = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_iterations: one_of(*ITERATIONS) = "jordan"  # Muon's Newton-Schulz polynomials (babyllama/muon.py)
    muon_dtype: one_of("float32", "auto") = "float32"  # Muon's Newton-Schulz matmuls; auto: bf16 when training is bf16
    normuon: bool = False  # NorMuon: each row of Muon's step divided by its running RMS (babyllama/muon.py)
    muon_momentum_warmup: NonNegative = 0  # steps over which Muon's momentum rises from 0.85 to 0.95; 0: 0.95
    embedding_lr_scale: PositiveFloat = 1.0  # the embedding and output matrices learn at lr times this
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping
    device: Device = "auto"  # auto, cpu, cuda, cuda:1...
    dtype: Dtype = "auto"  # auto (bfloat16 where supported), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model (costs tens of seconds at start)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) across processes
    seed: int = 1337
    log_interval: Positive = 10  # steps between log lines
    eval_interval: Positive = 200  # steps between validations
    save_interval: Positive = 500  # steps between checkpoints
    keep_last: NonNegative = 2  # numbered checkpoints kept besides ckpt.pt
    time_limit_min: NonNegativeFloat = 0.0  # stop (and save) after this many minutes; 0 for no limit
    time_budget_min: NonNegativeFloat = 0.0  # fit the steps (at most max_steps) into this many minutes; 0: off
    peak_tflops: NonNegativeFloat = 0.0  # the device's peak for MFU; 0 measures a matmul at start
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists
    out_dir_shared: one_of("auto", "true", "false") = "auto"  # one out_dir all nodes see? auto: a probe file tells;
    # false: each node's first process writes the checkpoints into its own out_dir
    dist_timeout_min: PositiveFloat = 10.0  # the longest wait for another process (joining, any collective)
    log_to: TrackerNames = ""  # also log to tensorboard, wandb, swanlab (comma-separated); on this machine
    # unless their own settings say otherwise (WANDB_MODE, SWANLAB_MODE)
    max_nonfinite_in_a_row: Positive = 10  # stop the run after this many non-finite losses in a row
    loss_chunk: NonNegative = 0  # positions per chunk of the output layer's loss (never the whole logits); 0: off
    checkpoint_activations: bool = False  # keep only each block's input, recompute the rest in the backward
    moe_balance: NonNegativeFloat = 0.01  # weight of a mixture of experts' balance loss (docs/12_moe.md); 0: none


@contextlib.contextmanager
def training_stage(config_cls: type[C], argv: list[str] | None, doc: str | None) -> Iterator[tuple[C, Dist]]:
    """A training command's main runs in this: its settings (defaults, config files, flags), its
    processes (one, or torchrun's), one line for an ordinary mistake, and the teardown."""
    with one_line_errors():
        cfg = parse_config(config_cls, argv, doc)
        dist = setup_distributed(cfg.device, cfg.dist_timeout_min)
        try:
            with lost_processes(dist.rank, dist.world_size, cfg.dist_timeout_min):
                yield cfg, dist
        except BaseException:
            teardown(dist, meet=False)  # the others may be gone: waiting for them would hang
            raise
        teardown(dist)


# ------------------------------------------------------------------ the optimizer step

class TrainingDiverged(UsageError):
    """Too many non-finite losses in a row: the message says what to change."""


@dataclass
class StepStats:
    loss: float  # mean over micro-batches and ranks; nan when skipped
    lr: float
    grad_norm: float
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)  # what loss_fn reported, averaged the same way


class Trainer:
    """Wraps the model for DDP/FSDP/compile and performs optimizer steps with gradient accumulation,
    as cfg says. It owns the learning-rate schedule (saved and restored with its state): it starts
    from cfg, max_steps overriding cfg.max_steps (a stage that counts epochs), and a time budget may
    fit its length."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, dist: Dist, max_steps: int = 0):
        if cfg.optimizer == "muon" and cfg.fsdp:
            raise UsageError("--optimizer=muon needs each matrix whole; it cannot be combined with --fsdp")
        if cfg.optimizer != "muon" and (cfg.normuon or cfg.muon_momentum_warmup):
            raise UsageError("--normuon and --muon_momentum_warmup change Muon's steps: they need --optimizer=muon")
        self.cfg, self.dist = cfg, dist
        self.schedule = Schedule(max_steps or cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr, cfg.lr_schedule,
                                 cfg.decay_share, budgeted=cfg.time_budget_min > 0)
        self.dtype, self.precision = resolve_dtype(cfg.dtype, dist.device)
        for module in model.modules():  # the Transformer, or the one inside a reward model
            if hasattr(module, "loss_chunk"):
                module.loss_chunk, module.checkpoint_activations = cfg.loss_chunk, cfg.checkpoint_activations
        self.raw_model = model.to(dist.device)
        self.model = self._wrap(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), dist.device,
                                        cfg.optimizer, cfg.muon_iterations, cfg.embedding_lr_scale,
                                        torch.bfloat16 if cfg.muon_dtype == "auto" and self.dtype == "bfloat16"
                                        else torch.float32, cfg.normuon)
        # A loss scaler only for float16: bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(dist.device.split(":")[0], enabled=self.dtype == "float16")
        self.step = 0
        self.nonfinite_total = 0
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
            if self.cfg.fsdp:
                self.raw_model.reshard()

    def release(self) -> None:
        """Drop the distributed wrapper; call before teardown()."""
        self.model = self.raw_model

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.fsdp:
            if not torch_dist.is_initialized():
                raise ValueError("fsdp needs a process group: launch with torchrun")
            from torch.distributed.fsdp import fully_shard
            for block in [m for m in model.modules() if type(m).__name__ == "TransformerBlock"]:
                fully_shard(block)  # one unit per block, so that only one block is gathered at a time
            fully_shard(model)
        if self.cfg.compile:
            model = torch.compile(model)
        if torch_dist.is_initialized() and not self.cfg.fsdp:  # under torchrun, one process too
            device_ids = [self.dist.local_rank] if self.dist.device.startswith("cuda") else None
            model = DDP(model, device_ids=device_ids)
        return model

    def _sync_context(self, last: bool):
        """Gradients are all-reduced on the last micro-step only (the seed synced on none of them)."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.raw_model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self, micro_batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], Any]) -> StepStats:
        """One optimizer step over the micro-batches (gradient accumulation); loss_fn(model, batch)
        returns the mean loss of one micro-batch, or (loss, {name: float}) with metrics to log."""
        s = self.cfg
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("muon"):
                group["momentum"] = momentum_at(self.step, s.muon_momentum_warmup)
        micro_batches = list(micro_batches)
        total, finite, metrics = 0.0, True, {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if self.cfg.fsdp and last:
                self.raw_model.set_requires_gradient_sync(True)
            with self._sync_context(last):
                routing_stats(self.raw_model)  # drop what a backward's recomputation (checkpoint_activations) recorded
                with autocast(self.dist.device, self.dtype):
                    out = loss_fn(self.model, batch)
                    loss, reported = out if isinstance(out, tuple) else (out, {})
                    loss = loss / len(micro_batches)
                    objective, reported = self._with_balance(loss, reported, len(micro_batches))
                finite &= bool(torch.isfinite(objective))
                self.scaler.scale(objective).backward()
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

    def _with_balance(self, loss: torch.Tensor, reported: dict, micro_steps: int) -> tuple[torch.Tensor, dict]:
        """loss plus a mixture of experts' balance loss (weighted by moe_balance), and the metrics with it and
        each expert's share of the tokens; loss and metrics as they were for a dense model."""
        stats = routing_stats(self.raw_model)
        if stats is None:
            return loss, reported
        balance, shares = stats
        reported = {**reported, "balance_loss": balance.detach(),
                    **{f"expert_share_{i:02d}": share for i, share in enumerate(shares.tolist())}}
        return loss + self.cfg.moe_balance * balance / micro_steps, reported

    def _skip(self, lr: float) -> StepStats:
        """A non-finite loss: drop the gradients, keep the weights, count it; many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row:
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step}: the run diverged. "
                "Lower the learning rate, use bfloat16 instead of float16, or resume from an earlier checkpoint")
        return StepStats(float("nan"), lr, float("nan"), True)

    # -------------------------------------------------------------- state

    def model_state(self) -> dict:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def state_dict(self) -> dict:
        """Everything an exact resume needs. It references live tensors: save it before the next step."""
        optimizer = self.optimizer.state_dict()
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            optimizer = get_optimizer_state_dict(self.raw_model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": self.model_state(), "optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "step": self.step, "nonfinite_total": self.nonfinite_total, "rng": rng_state(),
                "schedule": self.schedule.state_dict()}

    def resume(self, out_dir: str, allowed: bool, expect: dict) -> dict | None:
        """Load out_dir/ckpt.pt when it exists (None when it does not): refuse it unless allowed, or when
        its entries differ from expect (model_args, LoRA settings). Returns the checkpoint for the
        stage's own state (data position)."""
        path = os.path.join(out_dir, "ckpt.pt")
        seen = all_reduce_sum(float(os.path.exists(path)), self.dist)
        if 0 < seen < self.dist.world_size:  # else some ranks would resume and the others start afresh
            raise UsageError(f"rank {self.dist.rank}: {int(seen)} of {self.dist.world_size} processes see "
                             f"{path}: every node needs it (a folder all nodes share, or the newest ckpt.pt "
                             "copied into each node's --out_dir)")
        if not os.path.exists(path):
            return None
        if not allowed:
            raise FileExistsError(f"{path} exists; pass --resume=true to continue that run or choose another "
                                  "--out_dir")
        state = read_checkpoint(path)
        for key, value in expect.items():
            if state.get(key) != value:
                raise ValueError(f"{path} was made with other {key}: {state.get(key)} (this run: {value})")
        self.load_state_dict(state)
        if all_reduce_max(self.step, self.dist) != -all_reduce_max(-self.step, self.dist):
            raise UsageError(f"rank {self.dist.rank}: the nodes' {path} are of different steps (this one: "
                             f"{self.step}): copy the newest into each node's --out_dir")
        print0(f"resumed from {path} at step {self.step}", dist=self.dist)
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.fsdp:
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
        self.schedule.load_state_dict(state.get("schedule", {}))
        set_rng_state(state["rng"])


def frozen_reference(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """A copy of the starting model that stays fixed (eval mode, no gradients): the reference that DPO
    and GRPO measure the policy's drift from. Call before the policy trains."""
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------ the loop every stage runs

@dataclass
class Training:
    """A stage's training: the trainer, its data order, where a resumed run left off (state is the
    checkpoint, None on a fresh run), and what every checkpoint of the stage records besides the
    trainer's state."""
    trainer: Trainer
    order: Any  # dataset.WindowOrder over the stage's items (windows, samples, pairs, prompts)
    tokens_seen: int
    state: dict | None
    stage: str  # pretrain, sft, reward, dpo, grpo
    tokenizer_sha256: str
    peak_flops: float  # FLOP/s of one device, for MFU
    flops_per_token: float  # training FLOPs per token of the model
    shared_out_dir: bool  # every process sees one out_dir (else each node has its own)
    writes_checkpoints: bool  # this process writes them: rank 0, or each node's first process
    global_batch: int  # items an optimizer step takes over all processes


def checkpoint_writers(cfg: TrainConfig, dist: Dist) -> tuple[bool, bool]:
    """(whether out_dir is one folder for all processes, whether this process writes the checkpoints):
    in a shared out_dir rank 0 alone; in node-local ones each node's first process."""
    shared = cfg.out_dir_shared == "true" or (cfg.out_dir_shared == "auto" and sees_one_folder(cfg.out_dir, dist))
    if not shared and cfg.out_dir_shared == "auto":
        print0(f"{cfg.out_dir} is not one folder that every node sees: each node's first process writes the "
               "checkpoints into its own (--out_dir_shared=false)", dist=dist)
    return shared, dist.master if shared else dist.local_rank == 0


def keep_global_batch(cfg: TrainConfig, items_per_step: int, dist: Dist, items_flag: str, accumulates: bool) -> None:
    """A run saved by N processes and resumed on M keeps its global batch (items per optimizer step), so
    that its schedule and data order continue: grad_accum becomes N/M times the saved one, said in one
    line; where no whole grad_accum gives it (or the stage does not accumulate), a one-line error says
    what to set."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not (cfg.resume and os.path.exists(path)):
        return
    saved = read_checkpoint(path, mmap=True)
    saved_world = saved.get("data", {}).get("world_size", dist.world_size)
    if saved_world == dist.world_size:
        return
    wanted = saved.get("global_batch") or items_per_step * saved["config"]["grad_accum"] * saved_world
    per_micro_step = items_per_step * dist.world_size
    if not accumulates or wanted % per_micro_step:
        how = f"{items_flag} x --grad_accum" if accumulates else items_flag
        raise UsageError(f"{path} was saved by {saved_world} processes with {wanted} items a step: on "
                         f"{dist.world_size} choose {how} so that it times {dist.world_size} is {wanted} "
                         f"({items_flag}={items_per_step} now)")
    cfg.grad_accum = wanted // per_micro_step
    print0(f"{path} was saved by {saved_world} processes: on {dist.world_size}, --grad_accum={cfg.grad_accum} "
           f"keeps its {wanted} items a step", dist=dist)


def start_training(cfg: TrainConfig, model: torch.nn.Module, dist: Dist, n_items: int, items_per_step: int,
                   flops_per_token: float, *, stage: str, tokenizer_sha256: str, expect: dict | None = None,
                   items_flag: str = "--batch_size", accumulates: bool = True,
                   lengths: Sequence[int] | None = None) -> Training:
    """The common start of every stage: a rank-sharded order over n_items, the number of steps
    (cfg.max_steps, or cfg.epochs passes over the items), the trainer, a resume from out_dir/ckpt.pt
    when there is one (it must have the model's shape, this tokenizer, and what expect lists; a run
    saved by another number of processes keeps its global batch), which processes write the
    checkpoints, and the device's peak for MFU. Each process takes items_per_step items (the setting
    items_flag) a micro-step, cfg.grad_accum micro-steps a step when the stage accumulates. Given the
    items' lengths, each micro-step's items have similar lengths (dataset.group_by_length)."""
    from dataset import WindowOrder
    order = WindowOrder(n_items, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, lengths=lengths,
                        group=items_per_step * dist.world_size)
    keep_global_batch(cfg, items_per_step, dist, items_flag, accumulates)
    global_batch = items_per_step * (cfg.grad_accum if accumulates else 1) * dist.world_size
    steps_per_epoch = max(1, n_items // global_batch)
    trainer = Trainer(model, cfg, dist, max_steps=cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch))
    expect = {"model_args": asdict(model.args), "tokenizer_sha256": tokenizer_sha256, **(expect or {})}
    shared, writes = checkpoint_writers(cfg, dist)
    if writes:
        for path in remove_stale_temps(cfg.out_dir, ["ckpt*.pt", "metrics.jsonl", "*.json"]):
            print0(f"removed {path}, left by an interrupted run")
    state = trainer.resume(cfg.out_dir, cfg.resume, expect)
    tokens_seen = 0
    if state is not None:
        order.load_state_dict(state["data"])
        tokens_seen = state["tokens_seen"]
    peak = cfg.peak_tflops * 1e12 or measure_peak_flops(dist.device, trainer.dtype)
    schedule = trainer.schedule
    steps = f"{schedule.max_steps} steps"
    if schedule.budgeted and not schedule.fitted_to_budget:
        steps = f"at most {steps}, as many as fit in {cfg.time_budget_min:g} min"
    print0(f"{steps} ({schedule.max_steps / steps_per_epoch:.2f} passes over {n_items:,} items); "
           f"{dist.world_size} process(es) on {dist.device}; {trainer.precision}", dist=dist)
    return Training(trainer, order, tokens_seen, state, stage, tokenizer_sha256, peak, flops_per_token, shared,
                    writes, global_batch)


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


def metrics_line(metrics: dict[str, float]) -> str:
    """A step's metrics for the console; the experts' shares of the tokens as one group."""
    shares = [v for k, v in metrics.items() if k.startswith("expert_share_")]
    line = "".join(f" {k} {v:.3f}" for k, v in metrics.items() if not k.startswith("expert_share_"))
    return line + (f" experts {'/'.join(f'{v:.2f}' for v in shares)}" if shares else "")


def train_loop(training: Training, next_batches: Callable[[], tuple[list[Any], int]],
               loss_fn: Callable[[torch.nn.Module, Any], Any], evaluate: Callable[[], dict[str, float]] | None = None,
               own_state: Callable[[], dict] | None = None) -> None:
    """Train until the schedule's last step (fitted to cfg.time_budget_min when set): next_batches()
    gives the micro-batches of one step and the number of tokens they hold on this rank; evaluate()
    gives validation metrics; own_state() what a checkpoint holds that only this stage knows. Every
    checkpoint also has the model's args, the data position, the config, the tokenizer's sha256 and the
    stage. Logs to metrics.jsonl, checkpoints every save_interval steps, at the end, at the time limit
    and on SIGINT/SIGTERM."""
    trainer, cfg = training.trainer, training.trainer.cfg
    dist, tokens_seen = trainer.dist, training.tokens_seen
    settings = {**asdict(cfg), "stage": training.stage,
                "parameters": sum(p.numel() for p in trainer.raw_model.parameters())}
    run_name = f"{training.stage} {os.path.basename(os.path.abspath(cfg.out_dir))}"
    log = MetricsLog(cfg.out_dir, dist, resume_step=trainer.step if trainer.step else None,
                     trackers=open_trackers(cfg.log_to, cfg.out_dir, run_name, settings, dist.master))
    schedule = trainer.schedule
    budget = TimeBudget(cfg.time_budget_min, schedule, eval_interval=cfg.eval_interval,
                        save_interval=cfg.save_interval, step=trainer.step,
                        reduce_max=lambda value: all_reduce_max(value, dist))
    start_time = last_time = time.time()
    time_limit = start_time + 60 * cfg.time_limit_min if cfg.time_limit_min > 0 else math.inf
    last_tokens, last_step = tokens_seen, trainer.step

    def save() -> float:
        began = time.time()
        state = trainer.state_dict()
        state.update(tokens_seen=tokens_seen, model_args=asdict(trainer.raw_model.args),
                     data=training.order.state_dict(), global_batch=training.global_batch, config=asdict(cfg),
                     tokenizer_sha256=training.tokenizer_sha256, stage=training.stage, dtype=trainer.dtype,
                     **(own_state() if own_state else {}))
        if cfg.fsdp and not training.shared_out_dir:  # FSDP gathers the whole state on rank 0 alone
            state = broadcast_from_master(state, dist)
        if training.writes_checkpoints:
            save_checkpoint(cfg.out_dir, state, trainer.step, cfg.keep_last)
        return time.time() - began

    with log, StopSignal() as stop:
        while trainer.step < schedule.max_steps:
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
            if step % cfg.log_interval == 0 and (note := budget.adjust_to_speed(step)):
                print0(note, dist=dist)
            done = step >= schedule.max_steps
            stop_at = min(time_limit, budget.stop_at())
            over_time = stop_at < math.inf and all_reduce_max(float(time.time() > stop_at), dist) > 0
            console = None
            if step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or done or over_time or fit_now:
                now = time.time()
                speed = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
                # A device does at least what it was seen doing: a peak measured at a slow moment is raised.
                training.peak_flops = max(training.peak_flops, speed * training.flops_per_token / dist.world_size)
                mfu = speed * training.flops_per_token / (training.peak_flops * dist.world_size)
                record.update(tokens_per_s=speed, mfu=mfu)
                eta = (schedule.max_steps - step) * (now - last_time) / max(step - last_step, 1)
                eta = max(0.0, min(eta, stop_at - now))  # a time limit or budget may end the run first
                total = "?" if budget.pending else schedule.max_steps  # the budget has not set it yet
                console = (f"step {step}/{total} loss {stats.loss:.4f} lr {stats.lr:.2e} "
                           f"{speed:,.0f} tok/s MFU {100 * record['mfu']:.1f}% ETA {eta / 60:.1f} min"
                           + metrics_line(stats.metrics))
            eval_s = 0.0
            if evaluate is not None and not stats.skipped and (
                    step % cfg.eval_interval == 0 or done or over_time or fit_now):
                began = time.time()
                metrics = evaluate()
                eval_s = time.time() - began
                record.update(metrics)
                console += " | " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            if console is not None:
                print0(console, dist=dist)
                last_time, last_tokens, last_step = time.time(), tokens_seen, step  # speed excludes evaluation
            log.log(record)
            if step % cfg.save_interval == 0 or done or stop.requested or over_time or fit_now:
                save_s = save()
                if fit_now:
                    print0(budget.fit(step, eval_s, save_s), dist=dist)
                    last_time = time.time()
            if stop.requested or over_time:
                budget_spent = over_time and budget.pending and budget.stop_at() <= time_limit
                print0(budget.spent_before_fit(step) if budget_spent
                       else f"stopped at step {step}; rerun the same command to continue", dist=dist)
                break
    trainer.release()
