"""bench/gpu_check.py runs its whole table on a CPU with tiny shapes (eager, compiled, the loss in chunks
with activation checkpointing, DDP and FSDP2 under torchrun, decoding), so the GPU check cannot rot between
the times a GPU is at hand."""
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_every_row_on_the_cpu():
    command = [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device=cpu", "--presets", "tiny",
               "--dtype=float32", "--steps=1", "--batch_size=2", "--seq_len=32", "--decode_tokens=4",
               "--processes=1", "--port=29545", "--variants", "plain", "checkpointed", "--loss_chunk=24"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()}
    for name in ("train tiny eager", "train tiny compiled", "train tiny eager checkpointed",
                 "train tiny compiled checkpointed", "train tiny DDP x1", "train tiny FSDP2 x1",
                 "train tiny DDP x1 checkpointed", "train tiny FSDP2 x1 checkpointed", "decode tiny batch 1",
                 "decode tiny batch 32"):
        assert name in rows, (name, result.stdout)
        tokens_per_s = float(rows[name].split()[-4].replace(",", ""))  # columns: tokens/s, MFU, memory, planned
        assert tokens_per_s > 0, rows[name]
    assert "MFU against cpu:" in result.stdout and "%" in rows["train tiny eager"]


def test_gpu_check_without_a_gpu_says_so():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "no CUDA GPU here" in result.stderr and "Traceback" not in result.stderr
