"""speedrun.py end to end for a few seconds on tiny settings (the 10-minute run is a benchmark): a People's
Daily file in the PKU layout, our tokenizer, the corpus, a budgeted pretraining and the held-out score."""
import json
import os
import random
import subprocess
import sys

from conftest import POEMS, ROOT

PRESET = "dim = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 4\nmax_seq_len = 64\nvocab_size = 600\nmultiple_of = 16\n"


def peoples_daily(path, n_docs: int = 400) -> None:
    """Paragraphs in the PKU tagged layout, one a line, each different."""
    rng = random.Random(0)
    chars = sorted(set("".join(POEMS)) - set("，。 "))
    lines = []
    for i in range(n_docs):
        words = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 3))) for _ in range(30)]
        lines.append(f"19980101-01-001-{i:03d}/m  " + "  ".join(f"{w}/n" for w in words) + "  。/w")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_speedrun_end_to_end_on_tiny_settings(tmp_path):
    raw = tmp_path / "raw" / "peoples_daily"
    raw.mkdir(parents=True)
    peoples_daily(raw / "199801.txt")
    (raw / ".complete").write_text("")  # as download_data.py leaves it: nothing to fetch
    (tmp_path / "preset.py").write_text(PRESET)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "speedrun.py"), "--minutes=0.12", "--vocab_size=600",
                             f"--raw_dir={tmp_path / 'raw'}", f"--work_dir={tmp_path / 'work'}", "--name=ci",
                             f"--json={tmp_path / 'result.json'}",  # the record recipe: two config files
                             f"--flags=--model={tmp_path / 'preset.py'} --compile=false --batch_size=4 "
                             "--dtype=float32"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("speedrun: ") and "bits per character" in last and "float32 (trained)" in last
    record = json.loads((tmp_path / "result.json").read_text())
    assert 0 < record["bpc"] < 12 and record["steps"] > 0 and record["documents"] > 0 and record["dtype"] == "float32"
    assert record["tokens_seen"] == record["steps"] * 4 * 64
    assert record["pretrain_s"] < 0.12 * 60 + 15
    meta = json.loads((tmp_path / "work" / "data_600" / "meta.json").read_text())
    assert record["characters"] == meta["characters"]["val"]
