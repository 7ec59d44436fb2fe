"""What int8 weights (quantize.py) cost in quality on trained models: the perplexity of a corpus's val.bin
(eval_pretrain.py) and the greedy answers to held-out questions (eval.py), each with and without
--quantize=int8, through the scripts themselves.

    python bench/bench_int8_quality.py                  # the demo's four models, after `make demo`
    python bench/bench_int8_quality.py --ckpts=out/sft/ckpt.pt --bin=data/demo/val.bin
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "out/pretrain/ckpt.pt,out/sft/ckpt.pt,out/dpo/ckpt.pt,out/grpo/ckpt.pt"


def run(script: str, *flags: str) -> None:
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"error: {script} {' '.join(flags)} failed: {last}")


def measure(ckpt: str, args: argparse.Namespace, quantize: str, folder: str) -> tuple[float, list[str]]:
    """(perplexity of args.bin, greedy answers to args.val_data) with these weights."""
    scores, answers = os.path.join(folder, f"ppl{quantize}.json"), os.path.join(folder, f"eval{quantize}")
    common = [f"--ckpt={ckpt}", f"--tokenizer={args.tokenizer}", f"--quantize={quantize}"]
    run("eval_pretrain.py", *common, f"--bin={args.bin}", f"--json={scores}")
    run("eval.py", *common, f"--val_data={args.val_data}", f"--out={answers}")
    with open(scores, encoding="utf-8") as f:
        perplexity = json.load(f)["scores"]["bin"]["perplexity"]
    with open(os.path.join(answers, "answers.csv"), encoding="utf-8") as f:
        return perplexity, [row["prediction"] for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpts", default=DEMO, help="comma-separated checkpoints")
    parser.add_argument("--tokenizer", default="data/tokenizer/tokenizer.model")
    parser.add_argument("--bin", default="data/demo/val.bin", help="the corpus whose perplexity is compared")
    parser.add_argument("--val_data", default="sft_data/sft_val.csv", help="held-out questions for greedy answers")
    args = parser.parse_args()
    print("| model | perplexity, float32 | int8 | change | greedy answers identical |")
    print("|---|---|---|---|---|")
    for ckpt in args.ckpts.split(","):
        with tempfile.TemporaryDirectory() as folder:
            full, full_answers = measure(ckpt, args, "", folder)
            small, small_answers = measure(ckpt, args, "int8", folder)
        same = sum(a == b for a, b in zip(full_answers, small_answers))
        print(f"| {ckpt} | {full:.3f} | {small:.3f} | {small / full - 1:+.2%} | {same}/{len(full_answers)} "
              f"({same / len(full_answers):.0%}) |", flush=True)


if __name__ == "__main__":
    main()
