"""Does distillation pay on a CPU? A student (the speedrun's recipe, tiny_shallow) distilled from a bigger
teacher against the same student trained on the data alone, at the same wall time: the distilled run's
minutes include the teacher's forward passes. Both are scored like the speedrun (held-out bits per
character of People's Daily, babyllama/heldout.py), and so is the teacher.

    python bench/bench_distill.py --teacher_minutes=15 --minutes=5
    python bench/bench_distill.py --minutes=5 --distill_flags="--mix=0.9 --temperature=1"

The corpus and tokenizer are the speedrun's (made once under out/speedrun); the teacher (preset tiny,
the recipe's optimizer and schedule) is trained once per --teacher_minutes and reused.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from babyllama.checkpoint import load_model  # noqa: E402
from babyllama.heldout import corpus_bits  # noqa: E402

RECIPE = os.path.join(ROOT, "config", "pretrain_tiny.py")


def run(script: str, *flags: str) -> None:
    """A command of the repository; stops the bench with its last line when it fails."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed: {result.stderr.strip().splitlines()[-1]}")


def corpus(work: str, vocab_size: int) -> tuple[str, str]:
    """The speedrun's tokenizer and corpus of People's Daily (made when missing)."""
    tokenizer = os.path.join(work, f"tokenizer_{vocab_size}", "tokenizer.model")
    data = os.path.join(work, f"data_{vocab_size}")
    run("download_data.py", "--sources=peoples_daily", "--raw_dir=data/raw")
    if not os.path.isfile(tokenizer):
        run("train_tokenizer.py", "--sources=peoples_daily", "--raw_dir=data/raw", f"--out={tokenizer}",
            f"--vocab_size={vocab_size}")
    if not os.path.isfile(os.path.join(data, "val.bin")):
        run("data_process.py", "--sources=peoples_daily", "--raw_dir=data/raw", f"--tokenizer={tokenizer}",
            f"--out_dir={data}", "--val_fraction=0.01")
    return tokenizer, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="each student's wall time")
    parser.add_argument("--teacher_minutes", type=float, default=15.0)
    parser.add_argument("--teacher_model", default="tiny")
    parser.add_argument("--distill_flags", default="", help="more distill.py flags (--mix, --temperature, --top_k)")
    parser.add_argument("--work_dir", default="out/speedrun")
    args = parser.parse_args()
    tokenizer, data = corpus(args.work_dir, 8192)
    common = [RECIPE, f"--data={data}", f"--tokenizer={tokenizer}", "--max_steps=10000000", "--resume=false"]
    teacher = os.path.join(args.work_dir, "bench_distill", f"teacher_{args.teacher_model}_{args.teacher_minutes:g}min")
    if not os.path.isfile(os.path.join(teacher, "ckpt.pt")):
        run("pretrain.py", *common, f"--model={args.teacher_model}", f"--out_dir={teacher}",
            f"--time_budget_min={args.teacher_minutes}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    alone = os.path.join(args.work_dir, "bench_distill", f"alone_{stamp}")
    run("pretrain.py", *common, f"--out_dir={alone}", f"--time_budget_min={args.minutes}")
    distilled = os.path.join(args.work_dir, "bench_distill", f"distilled_{stamp}")
    run("distill.py", *common, f"--teacher={teacher}/ckpt.pt", f"--out_dir={distilled}",
        f"--time_budget_min={args.minutes}", *args.distill_flags.split())
    print("| run | held-out bpc | steps |\n|---|---|---|")
    for name, out in ((f"teacher ({args.teacher_model}, {args.teacher_minutes:g} min)", teacher),
                      (f"student alone ({args.minutes:g} min)", alone),
                      (f"student distilled ({args.minutes:g} min, teacher included) {args.distill_flags}", distilled)):
        steps = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False, mmap=True)["step"]
        bpc = corpus_bits(load_model(os.path.join(out, "ckpt.pt"))[0], data)["bpc"]
        print(f"| {name} | {bpc:.3f} | {steps:,} |")
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
