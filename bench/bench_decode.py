"""Batch-1 decode speed: our KV cache in float32 and with int8 weights (quantize.py) vs. recomputing the
whole sequence (the seed's way) vs. Hugging Face `LlamaForCausalLM.generate`, same shape, random
weights, greedy, one run.

    python bench/bench_decode.py --presets tiny baby_92m --new_tokens 256
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from babyllama.configurator import read_model_preset  # noqa: E402
from babyllama.quantize import quantize_int8  # noqa: E402
from model import Transformer  # noqa: E402


def hf_model(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM
    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, max_position_embeddings=a.max_seq_len,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def timed(fn, repeats: int) -> float:
    """Best wall time of fn over repeats (the least disturbed by the other jobs on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(preset: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(read_model_preset(preset, max_seq_len=prompt_len + new_tokens)).eval()
    prompt = torch.randint(3, model.args.vocab_size, (prompt_len,)).tolist()
    hf = hf_model(model)
    int8 = copy.deepcopy(model)
    quantize_int8(int8)
    ids = torch.tensor([prompt])

    def ours_cache():
        model.generate([prompt], new_tokens, eos_id=None)

    def ours_int8():
        int8.generate([prompt], new_tokens, eos_id=None)

    def ours_nocache():
        model.generate([prompt], new_tokens, eos_id=None, use_cache=False)

    @torch.inference_mode()
    def transformers_generate():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False)

    model.generate([prompt], 8, eos_id=None)  # warm-up
    int8.generate([prompt], 8, eos_id=None)
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    results = {"cache": new_tokens / timed(ours_cache, repeats), "int8": new_tokens / timed(ours_int8, repeats),
               "no_cache": new_tokens / timed(ours_nocache, 1),
               "transformers": new_tokens / timed(transformers_generate, repeats)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "baby_92m"])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, fp32, greedy")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'preset':<10} {'KV cache tok/s':>15} {'int8 tok/s':>11} {'int8 vs fp32':>13} {'no cache tok/s':>15} "
          f"{'transformers tok/s':>19} {'vs no cache':>12} {'vs transformers':>16}")
    for preset in args.presets:
        r = bench(preset, args.prompt_len, args.new_tokens, args.repeats)
        print(f"{preset:<10} {r['cache']:>15.1f} {r['int8']:>11.1f} {r['int8'] / r['cache']:>12.2f}x "
              f"{r['no_cache']:>15.1f} {r['transformers']:>19.1f} "
              f"{r['cache'] / r['no_cache']:>11.2f}x {r['cache'] / r['transformers']:>15.2f}x")


if __name__ == "__main__":
    main()
