"""The main job: every stage of the pipeline on the built-in real data, on a plain CPU.

    python demo.py            # or: make demo

Each stage runs as its own script (the README shows the same commands). A stage whose output is already
there is skipped, so a rerun continues where the last one stopped; a failed stage is named with its
command and the run stops there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from configurator import parse_config


@dataclass
class Config:
    data_dir: str = "data"  # raw sources, tokenizer and corpus go under it
    out_dir: str = "out"  # checkpoints and plots go under it
    vocab_size: int = 8192  # our tokenizer's size (config/tiny.py is sized for 8192)
    pretrain_steps: int = 1100  # optimizer steps of 4,096 tokens (about 10 minutes on 2 CPU cores)


def stages(cfg: Config) -> list[tuple[str, str | None, list[str]]]:
    """(name, the file that shows it is done or None to always run, command) for each stage in order.
    Training stages always run: they resume from their checkpoint and stop at once when complete."""
    raw, tok, corpus = f"{cfg.data_dir}/raw", f"{cfg.data_dir}/tokenizer", f"{cfg.data_dir}/demo"
    pretrain = f"{cfg.out_dir}/pretrain"
    return [
        ("download the built-in corpora", f"{raw}/dictionary/.complete",
         ["download_data.py", f"--raw_dir={raw}"]),
        ("train our tokenizer", f"{tok}/tokenizer.model",
         ["train_tokenizer.py", f"--raw_dir={raw}", f"--out={tok}/tokenizer.model", f"--vocab_size={cfg.vocab_size}"]),
        ("clean, deduplicate and tokenize the corpus", f"{corpus}/meta.json",
         ["data_process.py", f"--raw_dir={raw}", f"--tokenizer={tok}/tokenizer.model", f"--out_dir={corpus}"]),
        ("pretrain the tiny model", None,
         ["pretrain.py", "config/pretrain_tiny.py", f"--data={corpus}", f"--tokenizer={tok}/tokenizer.model",
          f"--out_dir={pretrain}", f"--max_steps={cfg.pretrain_steps}"]),
        ("plot the loss curve", None, ["plot.py", pretrain]),
    ]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv, __doc__)
    plan = stages(cfg)
    for i, (name, done_file, command) in enumerate(plan, 1):
        header = f"[{i}/{len(plan)}] {name}"
        if done_file is not None and os.path.exists(done_file):
            print(f"{header}: done already ({done_file})")
            continue
        print(f"{header}: python {' '.join(command)}", flush=True)
        start = time.time()
        result = subprocess.run([sys.executable, *command])
        if result.returncode != 0:
            raise SystemExit(f"stage '{name}' failed (exit {result.returncode}): python {' '.join(command)}\n"
                             "fix the error above and run demo.py again; finished stages are kept")
        print(f"{header}: finished in {time.time() - start:.0f} s")
    print("all stages done")


if __name__ == "__main__":
    main(sys.argv[1:])
