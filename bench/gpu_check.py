"""One GPU check of everything that runs on GPUs, in one table, in a few minutes on one GPU:
training steps of the seed's presets in bf16 (eager and compiled; tokens/s, MFU, peak memory) with the
fused AdamW, the trainer's DDP and FSDP2 wrappers under torchrun (nccl; one process is enough to run
the code), and KV-cache decoding at batch 1 and 32.

    python bench/gpu_check.py                                 # on a CUDA GPU
    python bench/gpu_check.py --device=cpu --presets=tiny --dtype=float32 --steps=2 --batch_size=2 \\
        --decode_tokens=4                                     # the same code on a CPU, in seconds (tests)

MFU is against the GPU's dense bf16 peak from babyllama/gpu_memory.py's table when its name is there, else against
the matmul peak measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from babyllama.configurator import read_model_preset  # noqa: E402
from babyllama.distributed import setup_distributed, teardown  # noqa: E402
from babyllama.gpu_memory import gpu_of_device_name, largest_micro_batch, training_memory  # noqa: E402
from babyllama.precision import matmul_flops, synchronize  # noqa: E402
from babyllama.trainer import TrainConfig, Trainer  # noqa: E402
from model import Transformer  # noqa: E402


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    """(FLOP/s, where it came from): the table's figure for a known GPU, else a matmul measured here."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        gpu = gpu_of_device_name(name)
        if gpu is not None:
            return gpu.bf16_tflops * 1e12, f"{name}: {gpu.bf16_tflops:g} TFLOP/s dense bf16 from the data sheet"
    measured = matmul_flops(device, dtype, seconds=1.0)
    return measured, f"{device}: {measured / 1e12:.2f} TFLOP/s measured ({dtype} matmul)"


def peak_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# The memory options of the training scripts: (--loss_chunk used, --checkpoint_activations).
VARIANTS = {"plain": (False, False), "chunked": (True, False), "checkpointed": (True, True)}


def train_config(args, mode: str, variant: str, fsdp: bool = False) -> TrainConfig:
    chunked, checkpointed = VARIANTS[variant]
    return TrainConfig(dtype=args.dtype, compile=mode == "compiled", fsdp=fsdp, max_steps=10**6, warmup_steps=1,
                       loss_chunk=args.loss_chunk if chunked else 0, checkpoint_activations=checkpointed)


def preset_args(preset: str, args):
    return read_model_preset(preset, max_seq_len=args.seq_len) if args.seq_len else read_model_preset(preset)


def train_row(preset: str, dist, args, mode: str, fsdp: bool = False, variant: str = "plain",
              batch_size: int = 0, steps: int = 0) -> dict:
    """Tokens/s over args.steps (or steps) optimizer steps (after warm-up) of the trainer's own step."""
    torch.manual_seed(0)
    model_args = preset_args(preset, args)
    T, batch_size, steps = model_args.max_seq_len, batch_size or args.batch_size, steps or args.steps
    reset_peak_memory(dist.device)
    model = Transformer(model_args)
    cfg = train_config(args, mode, variant, fsdp)
    trainer = Trainer(model, cfg, dist)
    x = torch.randint(3, model_args.vocab_size, (batch_size, T + 1), device=dist.device)
    batch = (x[:, :-1], x[:, 1:])

    def loss_fn(m, b):
        return m(b[0], b[1])[1]
    for _ in range(3 if mode == "compiled" else 1):
        trainer.train_step([batch], loss_fn)
    synchronize(dist.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([batch], loss_fn)
    synchronize(dist.device)
    seconds = time.perf_counter() - start
    trainer.release()
    tokens_per_s = steps * batch_size * T * dist.world_size / seconds
    planned = training_memory(model_args, batch_size, T, trainer.dtype, dist.world_size, fsdp,
                              loss_chunk=cfg.loss_chunk, checkpoint_activations=cfg.checkpoint_activations)
    return {"tokens_per_s": tokens_per_s, "flops": tokens_per_s * model.flops_per_token(T),
            "memory_gib": peak_memory_gib(dist.device), "dtype": trainer.dtype, "processes": dist.world_size,
            "planned_gib": planned.total / 2**30}


def largest_batch(preset: str, dist, args, variant: str) -> int:
    """The largest micro-batch whose eager training step fits in args.fit_gib of this GPU's memory
    (torch.cuda.set_per_process_memory_fraction), by bisection between 1 and 4096 sequences."""
    device = torch.device(dist.device).index or 0
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(args.fit_gib * 2**30 / total, device)
    low, high = 0, 4096
    try:
        while low < high:
            middle = (low + high + 1) // 2
            try:
                train_row(preset, dist, args, "eager", variant=variant, batch_size=middle, steps=1)
                low = middle
            except torch.OutOfMemoryError:
                high = middle - 1
            torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return low


def decode_row(preset: str, device: str, batch: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(read_model_preset(preset)).to(device).eval()
    if device != "cpu":
        model = model.to(torch.bfloat16)  # served in bf16 on a GPU
    reset_peak_memory(device)
    prompts = [[3 + (i * 7 + j) % 100 for j in range(16)] for i in range(batch)]
    model.generate(prompts, 2, eos_id=None)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    model.generate(prompts, new_tokens, eos_id=None)
    synchronize(device)
    return {"tokens_per_s": batch * new_tokens / (time.perf_counter() - start), "flops": None,
            "memory_gib": peak_memory_gib(device), "dtype": str(model.output.weight.dtype).removeprefix("torch."),
            "processes": 1}


def distributed_part(args) -> None:
    """Run under torchrun: DDP and FSDP2 training rows of the first preset, each memory variant; rank 0
    prints JSON."""
    dist = setup_distributed(args.device)
    try:
        rows = {f"{kind} x{dist.world_size}" + ("" if variant == "plain" else f" {variant}"):
                train_row(args.presets[0], dist, args, "eager", fsdp=kind == "FSDP2", variant=variant)
                for kind in ("DDP", "FSDP2") for variant in args.variants}
        if dist.master:
            print("ROWS " + json.dumps(rows), flush=True)
    finally:
        teardown(dist)


def run_distributed(args) -> dict:
    """This script under torchrun with args.processes processes; their rows."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.processes}",
               f"--master_port={args.port}", os.path.abspath(__file__), "--part=distributed",
               *[a for a in sys.argv[1:] if not a.startswith("--part")]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ROWS ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: the torchrun part failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def table(rows: dict[str, dict], peak: float) -> str:
    lines = [f"{'check':<40} {'dtype':<9} {'tokens/s':>12} {'MFU':>7} {'peak memory GiB':>16} {'planned':>8}"]
    for name, r in rows.items():
        mfu = f"{100 * r['flops'] / (peak * r['processes']):.1f}%" if r["flops"] else "-"
        memory = f"{r['memory_gib']:.2f}" if r["memory_gib"] is not None else "-"
        planned = f"{r['planned_gib']:.2f}" if r.get("planned_gib") else "-"
        lines.append(f"{name:<40} {r['dtype']:<9} {r['tokens_per_s']:>12,.0f} {mfu:>7} {memory:>16} {planned:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", nargs="+", default=["baby_92m", "baby_218m"])
    parser.add_argument("--dtype", default="bfloat16", help="training dtype (bfloat16, float16, float32, auto)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per training step")
    parser.add_argument("--seq_len", type=int, default=0, help="0 keeps the preset's max_seq_len")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    parser.add_argument("--decode_tokens", type=int, default=128, help="new tokens per decode row")
    parser.add_argument("--processes", type=int, default=1, help="torchrun processes for DDP and FSDP2 (0: skip)")
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS),
                        help="memory options of each training row: plain, chunked (--loss_chunk), checkpointed (both)")
    parser.add_argument("--loss_chunk", type=int, default=1024, help="the chunked variants' --loss_chunk")
    parser.add_argument("--fit_gib", type=float, default=0.0,
                        help="also find each variant's largest micro-batch in this many GiB of the GPU (0: skip)")
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--part", choices=["all", "distributed"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; pass --device=cpu to run the same code on the CPU")
    if args.part == "distributed":
        return distributed_part(args)
    began = time.time()
    dist = setup_distributed(args.device)
    peak, source = peak_flops(dist.device, "bfloat16" if args.dtype == "auto" else args.dtype)
    print(f"torch {torch.__version__}; MFU against {source}", flush=True)
    rows = {}
    for preset in args.presets:
        for mode in args.modes:
            for variant in args.variants:
                name = f"train {preset} {mode}" + ("" if variant == "plain" else f" {variant}")
                rows[name] = train_row(preset, dist, args, mode, variant=variant)
                print(f"  {name}: {rows[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
    if args.fit_gib and dist.device.startswith("cuda"):
        model_args = preset_args(args.presets[0], args)
        for variant in args.variants:
            chunked, checkpointed = VARIANTS[variant]
            planned = largest_micro_batch(model_args, model_args.max_seq_len, (args.fit_gib - 1.5) * 2**30,
                                          dtype=args.dtype, loss_chunk=args.loss_chunk if chunked else 0,
                                          checkpoint_activations=checkpointed)
            print(f"largest micro-batch of {args.presets[0]} in {args.fit_gib:g} GiB, {variant}: "
                  f"{largest_batch(args.presets[0], dist, args, variant)} measured, {planned} planned "
                  "(1.5 GiB kept free)", flush=True)
    if args.processes:
        rows.update({f"train {args.presets[0]} {k}": v for k, v in run_distributed(args).items()})
    for preset in args.presets:
        for batch in (1, 32):
            rows[f"decode {preset} batch {batch}"] = decode_row(preset, dist.device, batch, args.decode_tokens)
    print(table(rows, peak))
    print(f"{time.time() - began:.0f} s in all")


if __name__ == "__main__":
    main()
