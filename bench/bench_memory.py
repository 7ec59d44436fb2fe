"""Peak memory and time of a training step on the CPU: the plain loss (the whole float32 logits), the loss in
chunks (--loss_chunk) and with activation checkpointing as well (--checkpoint_activations), each in a process
of its own, against plan.py's model of the same run.

    python bench/bench_memory.py --preset baby_92m --batch 4 --loss_chunk 1024

Peak: resident memory less file-backed pages, sampled every half millisecond over three training steps, less
what the process held after warming up the same code on a one-layer model (the libraries' own memory).
Time: the median of the steps after those, in the same process. tests/test_plan.py uses measured_peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from babyllama.configurator import read_model_preset  # noqa: E402
from babyllama.gpu_memory import training_memory  # noqa: E402

MEASURE = """
import json, os, statistics, sys, threading, time, torch
sys.path.insert(0, {root!r})
from model import ModelArgs, Transformer
from babyllama.configurator import read_model_preset
from babyllama.trainer import TrainConfig, Trainer
from babyllama.distributed import Dist, keep_freed_memory
keep_freed_memory()
torch.set_num_threads(2)
cfg = TrainConfig(dtype={dtype!r}, max_steps=100, loss_chunk={loss_chunk}, checkpoint_activations={checkpoint})
def steps(model, batch, n):
    trainer = Trainer(model, cfg, Dist())
    x = torch.randint(3, model.args.vocab_size, (batch, model.args.max_seq_len + 1))
    times = []
    for _ in range(n):
        began = time.perf_counter()
        trainer.train_step([(x[:, :-1], x[:, 1:])], lambda m, b: m(b[0], b[1])[1])
        times.append(time.perf_counter() - began)
    return times
args = read_model_preset({preset!r}, **{overrides!r})
steps(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=256, max_seq_len=args.max_seq_len,
                            multiple_of=16)), 2, 2)
def anon():  # resident memory less file-backed pages (library code paged in on first use)
    with open("/proc/self/statm") as f:
        resident, shared = map(int, f.read().split()[1:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
before = anon()
sampler = threading.Thread(target=sample)
sampler.start()
times = steps(Transformer(args), {batch}, 3 + {timed})
running[0] = False
sampler.join()
print(json.dumps({{"peak": peak[0] - before, "step_s": statistics.median(times[3:]) if {timed} else None}}))
"""


def measure(preset: str, batch: int, dtype: str = "float32", loss_chunk: int = 0, checkpoint: bool = False,
            timed: int = 0, seq_len: int = 0) -> dict:
    """{'peak': bytes, 'step_s': median seconds of `timed` steps after the measured three (None for 0)};
    seq_len, when given, replaces the preset's window."""
    code = MEASURE.format(root=ROOT, preset=preset, batch=batch, dtype=dtype, loss_chunk=loss_chunk,
                          checkpoint=checkpoint, timed=timed, overrides={"max_seq_len": seq_len} if seq_len else {})
    # One malloc arena: with one per thread, how freed blocks are reused (and so the peak) varies from run to run.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.splitlines()[-1])


def measured_peak(preset: str, batch: int, dtype: str = "float32", **kw) -> float:
    return float(measure(preset, batch, dtype, **kw)["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="baby_92m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--loss_chunk", type=int, default=1024)
    parser.add_argument("--timed", type=int, default=5, help="steps timed after the three measured")
    a = parser.parse_args()
    import torch
    args = read_model_preset(a.preset)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {a.preset}, micro-batch {a.batch} x "
          f"{args.max_seq_len}, {a.dtype}")
    print(f"{'run':<30}{'peak MiB':>10}{'planned':>10}{'vs plain':>10}{'step s':>9}{'vs plain':>10}")
    plain = None
    runs = (("plain loss", 0, False), (f"loss in chunks of {a.loss_chunk}", a.loss_chunk, False),
            ("chunks + checkpointing", a.loss_chunk, True))
    for name, chunk, checkpoint in runs:
        got = measure(a.preset, a.batch, a.dtype, chunk, checkpoint, a.timed)
        planned = training_memory(args, a.batch, args.max_seq_len, a.dtype, loss_chunk=chunk,
                                  checkpoint_activations=checkpoint).total
        plain = plain or got
        print(f"{name:<30}{got['peak'] / 2**20:>10,.0f}{planned / 2**20:>10,.0f}{got['peak'] / plain['peak']:>10.2f}"
              f"{got['step_s']:>9.3f}{got['step_s'] / plain['step_s']:>10.2f}")


if __name__ == "__main__":
    main()
