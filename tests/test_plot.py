import json
import subprocess
import sys

import pytest

from plot import moving_average, plot, plot_budget


def test_plot_writes_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 30):
            record = {"step": step, "tokens": step * 1000, "loss": 5.0 / step}
            if step % 10 == 0:
                record["val_loss"] = 5.5 / step
            f.write(json.dumps(record) + "\n")
    lines = plot([str(tmp_path)], str(tmp_path / "loss.png"), 5)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    name = tmp_path.name
    train = [(step / 1000, 5.0 / step) for step in range(1, 30)]  # tokens in millions
    smoothed = moving_average([v for _, v in train], 5)
    assert lines[f"{name} train"] == pytest.approx([(x, v) for (x, _), v in zip(train, smoothed)])
    assert lines[f"{name} val"] == pytest.approx([(step / 1000, 5.5 / step) for step in (10, 20)])


def test_moving_average():
    assert moving_average([1, 3, 5, 7], 2) == [1, 2, 4, 6]


def test_missing_metrics_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "plot.py", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: no metrics at {tmp_path}/metrics.jsonl: train first "
                                                  "(pretrain.py writes metrics.jsonl)"]


def test_plot_any_metric_by_step_and_name_a_missing_one(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 20):
            f.write(json.dumps({"step": step, "tokens": step * 100, "loss": 1.0, "reward": step / 20}) + "\n")
    lines = plot([str(tmp_path)], str(tmp_path / "r.png"), 3, metric="reward", x="step")
    assert [x for x, _ in lines[f"{tmp_path.name} train"]] == list(range(1, 20))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    result = subprocess.run([sys.executable, "plot.py", str(tmp_path), "--metric=margin"], capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path} logged no 'margin' (its metrics: loss, "
                                                  "reward, step, tokens)"]


def test_budget_curve_from_speedrun_results(tmp_path):
    runs = [(10, 5.2, ""), (3, 6.0, ""), (60, 4.6, ""), (3, 6.3, "--model=tiny")]
    paths = []
    for i, (minutes, bpc, flags) in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"bpc": bpc, "minutes": minutes, "cpu": "AVX2", "dtype": "float32",
                                         "settings": {"flags": flags}}))
    lines = plot_budget([str(p) for p in paths], str(tmp_path / "budget.png"))
    assert lines == {"the recipe, AVX2 float32": [(3, 6.0), (10, 5.2), (60, 4.6)],
                     "--model=tiny, AVX2 float32": [(3, 6.3)]}
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    result = subprocess.run([sys.executable, "plot.py", *map(str, paths), f"--out={tmp_path}/b.png"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and (tmp_path / "b.png").is_file(), result.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"steps": 3}))
    result = subprocess.run([sys.executable, "plot.py", str(paths[0]), str(other)], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: {other} is neither eval_pretrain.py --long_context=8 --json={other}'s result (by_position) nor "
        "speedrun.py's (bpc and minutes)"]
