"""Causal attention, forward + backward, on this CPU: PyTorch's fused kernel
(`F.scaled_dot_product_attention`, flash attention on CPU) against the same thing written as two matmuls
and a softmax (`model.causal_attention_by_matmul`), eager and compiled, for several sequence lengths.
model.py picks the matmul form where this shows it faster.

    python bench/bench_attention.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import causal_attention_by_matmul  # noqa: E402


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return causal_attention_by_matmul(q, k, v, 0.0)


def milliseconds(attention, shape: tuple[int, int, int, int], dtype: torch.dtype, repeats: int) -> float:
    """Best time of one forward + backward."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    for _ in range(2):  # warm-up (and compilation)
        attention(q, k, v).backward(grad)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        attention(q, k, v).backward(grad)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # (batch, heads, tokens, head_dim): 4,096 tokens a step; tiny (6 x 48) and baby_92m (8 x 64) heads.
    shapes = [(32, 6, 128, 48), (16, 6, 256, 48), (16, 8, 256, 64), (8, 6, 512, 48), (8, 8, 512, 64),
              (4, 8, 1024, 64)]
    print(f"torch {torch.__version__}, {args.threads} threads; ms per forward + backward of one layer, best of "
          f"{args.repeats}")
    print(f"{'dtype':<9} {'B, heads, T, head_dim':<22} {'fused':>7} {'matmuls':>8} {'ratio':>6} "
          f"{'fused comp.':>11} {'matmuls comp.':>13} {'ratio':>6}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for shape in shapes:
            torch._dynamo.reset()
            times = [milliseconds(f, shape, dtype, args.repeats)
                     for f in (fused, matmuls, torch.compile(fused), torch.compile(matmuls))]
            print(f"{name:<9} {str(shape):<22} {times[0]:>7.1f} {times[1]:>8.1f} {times[1] / times[0]:>5.2f}x "
                  f"{times[2]:>11.1f} {times[3]:>13.1f} {times[3] / times[2]:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
