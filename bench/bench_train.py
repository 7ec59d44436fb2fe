"""Training throughput and MFU: our model.py against `transformers`' LlamaForCausalLM at the same shape,
batch and dtype, eager and torch.compile, in one run. MFU is against the matmul peak of the same dtype,
measured just before and just after each row (the higher of the two: on a shared machine the speed
drifts within a run, and the peak of another moment would make MFU drift with it). glibc is asked to
keep freed memory (trainer.keep_freed_memory), for both models, as the training scripts do.

    python bench/bench_train.py --presets tiny baby_92m --dtypes auto float32 --modes eager compiled

`auto` is the dtype the training scripts choose on this CPU (trainer.resolve_dtype: bfloat16 only where
its matmul is faster than float32's here); the line above the table says which and why. bfloat16 on a
CPU without native bf16 instructions (AVX2) is many times slower: ask for it only to see that.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_module  # noqa: E402
from babyllama.configurator import read_model_preset  # noqa: E402
from babyllama.distributed import keep_freed_memory  # noqa: E402
from babyllama.precision import autocast, measure_peak_flops, resolve_dtype  # noqa: E402
from babyllama.trainer import make_optimizer  # noqa: E402
from model import Transformer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import hf_model  # noqa: E402


def train_speed(model, loss_of, batch: tuple[torch.Tensor, torch.Tensor], dtype: str, steps: int,
                warmup: int) -> tuple[float, float]:
    """(tokens per second over `steps` optimizer steps, seconds of the warm-up steps)."""
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), "cpu")
    x, y = batch

    def step():
        with autocast("cpu", dtype):
            loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.numel() / (time.perf_counter() - start), warm


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    # Same targets as ours: logits at every input position against the next token.
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "baby_92m"])
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32"], help="auto, float32, bfloat16, float16")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--batch_tokens", type=int, default=4096, help="tokens per step (batch x max_seq_len)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", choices=["auto", "kernel"], default="auto",
                        help="kernel: our model always uses F.scaled_dot_product_attention (the previous "
                             "behaviour), to compare with model.py's choice")
    args = parser.parse_args()
    if args.attention == "kernel":
        model_module._matmul_attention_is_faster = lambda q: False
    torch.set_num_threads(args.threads)
    # As our training scripts do on a CPU; it applies to the whole process, so to transformers as well.
    kept = keep_freed_memory()
    auto, reason = resolve_dtype("auto", "cpu")
    dtypes = list(dict.fromkeys(auto if d == "auto" else d for d in args.dtypes))
    print(f"torch {torch.__version__}, {args.threads} threads, freed memory kept for reuse: {kept}")
    print(f"dtype auto: {reason}")
    print(f"{'preset':<9} {'dtype':<9} {'mode':<9} {'ours tok/s':>10} {'MFU':>6} {'transformers tok/s':>18} "
          f"{'ratio':>6} {'warm-up s (ours/hf)':>20} {'peak GFLOP/s':>12}")
    for preset in args.presets:
        model_args = read_model_preset(preset)
        T = model_args.max_seq_len
        B = max(1, args.batch_tokens // T)
        torch.manual_seed(0)
        x = torch.randint(3, model_args.vocab_size, (B, T + 1))
        batch = (x[:, :-1], x[:, 1:])
        for dtype in dtypes:
            for mode in args.modes:
                torch.manual_seed(0)
                ours = Transformer(model_args)
                hf = hf_model(ours).train()
                flops = ours.flops_per_token(T)
                run_ours = torch.compile(ours) if mode == "compiled" else ours
                run_hf = torch.compile(hf) if mode == "compiled" else hf
                warm = 3 if mode == "compiled" else 1
                peak = measure_peak_flops("cpu", dtype, seconds=1.0)
                # Two rounds, alternating, best of each: neither side pays the other's cold start.
                ours_speed, ours_warm = train_speed(run_ours, ours_loss, batch, dtype, args.steps, warm)
                hf_speed, hf_warm = train_speed(run_hf, hf_loss, batch, dtype, args.steps, warm)
                ours_speed = max(ours_speed, train_speed(run_ours, ours_loss, batch, dtype, args.steps, 0)[0])
                hf_speed = max(hf_speed, train_speed(run_hf, hf_loss, batch, dtype, args.steps, 0)[0])
                peak = max(peak, measure_peak_flops("cpu", dtype, seconds=1.0))
                mfu = ours_speed * flops / peak
                print(f"{preset:<9} {dtype:<9} {mode:<9} {ours_speed:>10,.0f} {100 * mfu:>5.1f}% {hf_speed:>18,.0f} "
                      f"{ours_speed / hf_speed:>5.2f}x {ours_warm:>9.0f} / {hf_warm:<8.0f} {peak / 1e9:>12.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
