"""The speedrun: how good a Chinese model a CPU pretraining budget buys, in held-out bits per character.

    python speedrun.py --minutes=10                     # the record recipe (the demo's): config/speedrun.py on the base
    python speedrun.py --minutes=3 --flags="--lr=3e-3"  # an ablation: pretrain.py flags on top of the recipe
    python speedrun.py --minutes=10 --recipe=config/pretrain_tiny.py    # the base recipe alone

On the built-in People's Daily corpus (January 1998): trains our tokenizer on its training documents, makes
the corpus (val.bin holds the held-out documents: 1% by hash of their text, the same whatever the
tokenizer), pretrains the recipe with the budget (pretraining's wall time, compilation included, is the
budget: the schedule is fitted to it and always ends annealed), then scores every held-out document
(heldout.py; docs/speedrun.md). Tokenizer and corpus are made once per vocabulary size and reused; their
times are reported apart. The last line says: bpc, steps, tokens seen, dtype, CPU capability.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from babyllama.checkpoint import load_model
from babyllama.common import write_json_atomic
from babyllama.configurator import OutputDir, OutputFile, PositiveFloat, in_range, parse_config
from babyllama.errors import UsageError, one_line_errors
from babyllama.heldout import corpus_bits
from chatglm_tokenizer import MIN_VOCAB

ROOT = os.path.dirname(os.path.abspath(__file__))
UNCAPPED_STEPS = 10**7  # the budget alone sets the steps, whatever the recipe's max_steps


@dataclass
class Config:
    minutes: PositiveFloat = 10.0  # the pretraining budget
    recipe: str = "config/pretrain_tiny.py,config/speedrun.py"  # pretrain.py settings: its config files, in order
    vocab_size: in_range(MIN_VOCAB, 65535, int) = 8192  # our tokenizer's size
    flags: str = ""  # more pretrain.py flags on top of the recipe (ablations)
    raw_dir: OutputDir = "data/raw"  # where download_data.py puts People's Daily
    work_dir: OutputDir = "out/speedrun"  # tokenizers, corpora and runs
    name: str = ""  # the run's folder under work_dir/runs ('' for the time it started)
    json: OutputFile = ""  # also write the result here


def stage(command: list[str]) -> float:
    """Run a step of the pipeline, its output shown as it comes; its wall time in seconds. When it fails,
    UsageError with the step's own last line (its reason)."""
    began = time.time()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, command[0]), *command[1:]], stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(process.stderr.fileno(), 1 << 16):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    if process.wait() != 0:
        raise UsageError(f"{command[0]} stopped: {last_line(tail, process.returncode)}")
    return time.time() - began


def check_settings(pretrain: list[str]) -> None:
    """pretrain.py's check of the recipe and the flags, quietly: UsageError with its reason."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, pretrain[0]), *pretrain[1:], "--check_settings=true"],
                            capture_output=True)
    if result.returncode != 0:
        raise UsageError(f"the recipe and --flags: {last_line(result.stderr, result.returncode)}")


def last_line(stderr: bytes, returncode: int) -> str:
    """The reason a step gave for failing: its last line, without the `error: `."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else f"exit {returncode}"


def prepare(cfg: Config) -> tuple[str, str, dict]:
    """The tokenizer and the corpus for cfg.vocab_size (made once), and the times they took."""
    tokenizer = os.path.join(cfg.work_dir, f"tokenizer_{cfg.vocab_size}", "tokenizer.model")
    data = os.path.join(cfg.work_dir, f"data_{cfg.vocab_size}")
    times = {"download_s": stage(["download_data.py", "--sources=peoples_daily", f"--raw_dir={cfg.raw_dir}"])}
    times["tokenizer_s"] = 0.0 if os.path.isfile(tokenizer) else stage(
        ["train_tokenizer.py", "--sources=peoples_daily", f"--raw_dir={cfg.raw_dir}", f"--out={tokenizer}",
         f"--vocab_size={cfg.vocab_size}"])
    times["corpus_s"] = stage(["data_process.py", "--sources=peoples_daily", f"--raw_dir={cfg.raw_dir}",
                               f"--tokenizer={tokenizer}", f"--out_dir={data}", "--val_fraction=0.01"])
    return tokenizer, data, times


def recipe_files(recipe: str) -> list[str]:
    """The config files of a comma-separated recipe; those in config/ are found from any folder."""
    files = []
    for name in recipe.split(","):
        in_repo = os.path.join(ROOT, name)
        files.append(in_repo if not os.path.isfile(name) and os.path.isfile(in_repo) else name)
    return files


def score(ckpt: str, data: str) -> dict:
    """Held-out bits per character of the checkpoint on data/val.bin (heldout.py's protocol)."""
    model, state = load_model(ckpt)
    return {**corpus_bits(model, data), "steps": state["step"], "tokens_seen": state["tokens_seen"],
            "dtype": state["dtype"]}


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        run_dir = os.path.join(cfg.work_dir, "runs", cfg.name or time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            raise UsageError(f"{run_dir} holds a run already; choose another --name")
        pretrain = ["pretrain.py", *recipe_files(cfg.recipe), f"--out_dir={run_dir}",
                    f"--time_budget_min={cfg.minutes}", "--resume=false", f"--max_steps={UNCAPPED_STEPS}"]
        check_settings([*pretrain, "--tokenizer=", *cfg.flags.split()])  # before the long steps
        tokenizer, data, times = prepare(cfg)
        times["pretrain_s"] = stage([*pretrain, f"--data={data}", f"--tokenizer={tokenizer}", *cfg.flags.split()])
        began = time.time()
        result = score(os.path.join(run_dir, "ckpt.pt"), data)
        times["scoring_s"] = time.time() - began
        result.update(times, cpu=torch.backends.cpu.get_cpu_capability(), minutes=cfg.minutes,
                      settings=asdict(cfg))
        write_json_atomic(os.path.join(run_dir, "speedrun.json"), result)
        if cfg.json:
            write_json_atomic(cfg.json, result)
        print(f"speedrun: {result['bpc']:.4f} bits per character on {result['documents']:,} held-out documents "
              f"({result['characters']:,} characters); {result['steps']} steps, {result['tokens_seen'] / 1e6:.2f}M "
              f"tokens seen in {cfg.minutes:g} min ({times['pretrain_s']:.0f} s), {result['dtype']} (trained), "
              f"CPU {result['cpu']}; "
              f"tokenizer {times['tokenizer_s']:.0f} s, corpus {times['corpus_s']:.0f} s, scoring "
              f"{times['scoring_s']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
