"""Will it fit, and how long will it take? Memory per GPU, the largest micro-batch, the gradient
accumulation for a number of tokens per step, and the time and cost of a pretraining run.

    python plan.py --model=baby_218m --gpu=3090 --gpus=4 --tokens=10B
    python plan.py --model=baby_92m --gpu=H100 --gpus=8 --tokens=50B --mfu=0.45
    python plan.py --model=baby_218m --gpu=4090 --gpus=8 --nodes=2 --network_gbit=25

Memory comes from babyllama/gpu_memory.py (checked against measured peaks on a CPU); time is the
training FLOPs (model.flops_per_token) over the GPUs' dense bf16 peak at the stated MFU. Measure your
own MFU with bench/gpu_check.py and pass it with --mfu. Over several nodes, each optimizer step also
sends the bytes of gradient_traffic between them (docs/10_distributed.md); its time at --network_gbit is
added where it exceeds the compute it could hide behind.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

import torch

from babyllama.configurator import (
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    PositiveFraction,
    SeqLen,
    in_range,
    one_of,
    parse_config,
    read_model_preset,
)
from babyllama.errors import SettingError, one_line_errors
from babyllama.gpu_memory import GPUS, MemoryPlan, gradient_traffic, largest_micro_batch, training_memory
from model import Transformer

MAX_GPUS = 1 << 20  # past the largest clusters built; larger counts are typing mistakes
MAX_TOKENS = 1e15  # likewise: some hundred times the largest training runs


@dataclass
class Config:
    model: str = "baby_92m"  # model preset (tiny, baby_92m, baby_218m) or a path to one
    gpu: one_of(*GPUS) = "3090"  # H200, H100, A100-80G, L40S, 4090, 3090, T4... (all: babyllama.gpu_memory.GPUS)
    gpus: in_range(1, MAX_GPUS, int) = 1  # GPUs in all, one process each
    nodes: in_range(1, MAX_GPUS, int) = 1  # machines the GPUs are spread over, the same number on each
    network_gbit: PositiveFloat = 100.0  # each node's network between nodes, Gbit/s (100: InfiniBand EDR, RoCE)
    fsdp: bool = False  # the time of a run with --fsdp (more traffic between nodes); memory shows both
    tokens: str = "10B"  # training tokens: 10B, 500M, 2e9...
    seq_len: SeqLen = 0  # 0 keeps the preset's max_seq_len
    tokens_per_step: Positive = 65536  # tokens per optimizer step (the seed's recipe: 32 x 4 x 512)
    micro_batch: in_range(0, 1 << 16, int) = 0  # sequences per GPU per micro-step; 0: the largest fitting without FSDP
    dtype: one_of("bfloat16", "float16", "float32") = "bfloat16"  # bfloat16, float16 or float32
    mfu: PositiveFraction = 0.35  # the model FLOPs utilisation assumed for the time (bench/gpu_check.py measures it)
    usd_per_gpu_hour: NonNegativeFloat = 0.0  # 0: the table's typical cloud price
    reserve_gib: NonNegativeFloat = 1.5  # GPU memory left for the CUDA context and the allocator
    loss_chunk: NonNegative = 0  # the training scripts' --loss_chunk: the loss in chunks of this many positions
    checkpoint_activations: bool = False  # the training scripts' --checkpoint_activations


def parse_count(text: str) -> float:
    """'10B' -> 1e10; also K, M, T and plain or scientific numbers."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        raise ValueError(f"--tokens: expected a count such as 10B, 500M or 2e9, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    count = float(match.group(1)) * scale
    if not 1 <= count <= MAX_TOKENS:
        raise ValueError(f"--tokens={text}: expected from 1 to {MAX_TOKENS:.0e} tokens")
    return count


def gib(n: float) -> str:
    return f"{n / 2**30:8.2f}"


def memory_table(plain: MemoryPlan, sharded: MemoryPlan, gpus: int) -> list[str]:
    rows = [("float32 weights", "weights"), ("half-precision copies (autocast)", "half_weights"),
            ("gradients", "gradients"), ("AdamW moments", "optimizer"), ("activations", "activations"),
            ("logits (loss, float32)", "logits"), ("backward buffers", "backward")]
    lines = [f"  {'GiB per GPU':<34}{'without FSDP':>14}{f'FSDP x{gpus}':>14}"]
    lines += [f"  {label:<34}{gib(getattr(plain, key)):>14}{gib(getattr(sharded, key)):>14}" for label, key in rows]
    lines.append(f"  {'total':<34}{gib(plain.total):>14}{gib(sharded.total):>14}")
    return lines


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        if cfg.gpus % cfg.nodes:
            raise SettingError(f"--gpus={cfg.gpus} over --nodes={cfg.nodes}: give each node the same number of GPUs")
        tokens = parse_count(cfg.tokens)
        overrides = {"max_seq_len": cfg.seq_len} if cfg.seq_len else {}
        args = read_model_preset(cfg.model, **overrides)
        gpu, T = GPUS[cfg.gpu], args.max_seq_len
        with torch.device("meta"):  # the shapes only, no memory
            model = Transformer(args)
        flops_per_token = model.flops_per_token(T)
        if cfg.checkpoint_activations:  # the blocks' forward runs twice: a third of their FLOPs more
            flops_per_token += (flops_per_token - 6 * args.vocab_size * args.dim) / 3
        print(f"{cfg.model}: {model.num_params() / 1e6:.1f}M parameters "
              f"({model.num_params(count_tied_twice=True) / 1e6:.1f}M counting the tied embedding twice"
              + (f"; {model.num_active_params() / 1e6:.1f}M active: {args.n_active_experts} of {args.n_experts} "
                 "experts a token" if args.n_experts else "")
              + f"), {T} tokens a sequence, {flops_per_token:.3g} training FLOPs a token"
              + (" (the blocks' forward twice: activation checkpointing)" if cfg.checkpoint_activations else ""))

        capacity = (gpu.memory_gib - cfg.reserve_gib) * 2**30
        kw = {"dtype": cfg.dtype, "processes": cfg.gpus, "loss_chunk": cfg.loss_chunk,
              "checkpoint_activations": cfg.checkpoint_activations}
        fit_plain = largest_micro_batch(args, T, capacity, **kw)
        fit_fsdp = largest_micro_batch(args, T, capacity, fsdp=True, **kw)
        micro = cfg.micro_batch or max(1, fit_plain or fit_fsdp)
        print(f"\nmemory of one training process, micro-batch {micro} x {T} tokens, {cfg.dtype}:")
        print("\n".join(memory_table(training_memory(args, micro, T, **kw),
                                     training_memory(args, micro, T, fsdp=True, **kw), cfg.gpus)))
        print(f"\nlargest micro-batch in {gpu.memory_gib:g} GiB ({cfg.gpu}, {cfg.reserve_gib:g} GiB kept free): "
              f"{fit_plain} without FSDP, {fit_fsdp} with FSDP over {cfg.gpus} GPU(s)")
        if fit_plain == 0 and fit_fsdp == 0:
            print("not even one sequence fits: a shorter --seq_len, a smaller model or a larger GPU")
        elif cfg.micro_batch > max(fit_plain, fit_fsdp):
            print(f"warning: --micro_batch={cfg.micro_batch} does not fit in {gpu.memory_gib:g} GiB, even with "
                  f"FSDP: at most {max(fit_plain, fit_fsdp)}")
        per_micro_step = micro * T * cfg.gpus
        accum = max(1, math.ceil(cfg.tokens_per_step / per_micro_step))
        tokens_per_step = per_micro_step * accum
        nodes = (f"--nnodes={cfg.nodes} --node_rank=<0..{cfg.nodes - 1}> --master_addr=<node 0> "
                 if cfg.nodes > 1 else "")
        print(f"tokens per optimizer step: {micro} x {T} x {cfg.gpus} GPU(s) x grad_accum {accum} = "
              f"{tokens_per_step:,} (asked: {cfg.tokens_per_step:,}); torchrun {nodes}"
              f"--nproc_per_node={cfg.gpus // cfg.nodes} pretrain.py --batch_size={micro} --grad_accum={accum}"
              + (" --fsdp=true" if cfg.fsdp else ""))

        steps = tokens / tokens_per_step
        compute_s = tokens_per_step * flops_per_token / (cfg.gpus * gpu.bf16_tflops * 1e12 * cfg.mfu)
        network_s = 0.0
        if cfg.nodes > 1:
            sent = gradient_traffic(model.num_params(), cfg.nodes, accum, fsdp=cfg.fsdp)
            network_s = sent / (cfg.network_gbit * 1e9 / 8)
            print(f"between nodes, each node sends {sent / 2**30:.2f} GiB a step ({'FSDP' if cfg.fsdp else 'DDP'}): "
                  f"{network_s:.2f} s at {cfg.network_gbit:g} Gbit/s against {compute_s:.2f} s of compute"
                  + ("; the network sets the pace" if network_s > compute_s else ""))
        # The gradients' exchange overlaps the backward pass: only what exceeds the compute adds time.
        hours = steps * max(compute_s, network_s) / 3600
        price = cfg.usd_per_gpu_hour or gpu.usd_per_hour
        print(f"time for {tokens:.3g} tokens at {100 * cfg.mfu:.0f}% MFU of {cfg.gpus} x {gpu.bf16_tflops:g} TFLOP/s: "
              f"{hours:.1f} h ({hours / 24:.1f} days), about ${hours * cfg.gpus * price:,.0f} "
              f"at ${price:g} a GPU-hour; {steps:,.0f} optimizer steps")


if __name__ == "__main__":
    main(sys.argv[1:])
