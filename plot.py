"""Loss (or any logged metric) against tokens seen, train and validation, from one or more runs'
metrics.jsonl, as a PNG.

    python plot.py out/pretrain                       # writes out/pretrain/loss.png
    python plot.py out/run_a out/run_b --out=compare.png --smooth=50
    python plot.py out/grpo --metric=reward --x=step  # writes out/grpo/reward.png
    python plot.py out/long.json out/long_extended.json --out=long.png
                                    # bits per character by position (eval_pretrain.py --long_context)
    python plot.py out/speedrun/runs/*/speedrun.json --out=budget.png
                                    # held-out bits per character against the budget (speedrun.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from babyllama.configurator import OneLineParser  # noqa: E402
from babyllama.errors import UsageError, one_line_errors  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def read_metrics(path: str) -> list[dict]:
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"no metrics at {file}: train first (pretrain.py writes metrics.jsonl)")
    records = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{file}:{number} is not JSON") from None
    return records


def moving_average(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


LABELS = {"loss": "cross-entropy loss (nats per token)", "tokens": "tokens seen (millions)", "step": "optimizer step"}


def plot(runs: list[str], out: str, smooth: int, metric: str = "loss",
         x: str = "tokens") -> dict[str, list[tuple[float, float]]]:
    """One line per run for the metric (smoothed) and one for val_<metric> where the run logged it;
    returns the points of each line drawn, by its label."""
    fig, ax = plt.subplots(figsize=(8, 5))
    scale = 1e6 if x == "tokens" else 1
    for run in runs:
        records = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        train = [(r[x], r[metric]) for r in records if metric in r and r[metric] == r[metric]]  # no NaN
        val = [(r[x], r[f"val_{metric}"]) for r in records if f"val_{metric}" in r]
        if not train and not val:
            raise UsageError(f"{run} logged no '{metric}' (its metrics: "
                             f"{', '.join(sorted({k for r in records for k in r}))})")
        if train:
            ax.plot([t / scale for t, _ in train], moving_average([v for _, v in train], smooth),
                    label=f"{name} train")
        if val:
            ax.plot([t / scale for t, _ in val], [v for _, v in val], "o-", label=f"{name} val")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(metric, metric))
    return save(fig, ax, out)


def save(fig, ax, out: str) -> dict[str, list[tuple[float, float]]]:
    """Write the figure; the points of each labelled line, by its label."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def read_result(path: str) -> dict:
    """An eval_pretrain.py or speedrun.py JSON result."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None
    if not isinstance(result, dict) or not ("by_position" in result or {"bpc", "minutes"} <= result.keys()):
        raise UsageError(f"{path} is neither eval_pretrain.py --long_context=8 --json={path}'s result (by_position) "
                         f"nor speedrun.py's (bpc and minutes)")
    return result


def read_by_position(path: str) -> dict:
    result = read_result(path)
    if "by_position" not in result:
        raise UsageError(f"{path} has no by_position: write it with eval_pretrain.py --long_context=8 --json={path}")
    return result["by_position"]


def plot_budget(files: list[str], out: str) -> dict[str, list[tuple[float, float]]]:
    """Held-out bits per character against the pretraining budget, one line per recipe (its flags), CPU
    capability and dtype; returns the points of each line by its label."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for path in files:
        r = read_result(path)
        if "bpc" not in r:
            raise UsageError(f"{path} is not a speedrun.py result (bpc and minutes): plot speedrun results together")
        flags = r.get("settings", {}).get("flags") or "the recipe"
        lines.setdefault(f"{flags}, {r.get('cpu', '?')} {r.get('dtype', '?')}", []).append((r["minutes"], r["bpc"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in lines.items():
        points.sort()
        ax.plot([m for m, _ in points], [b for _, b in points], "o-", label=label)
        for m, b in points:
            ax.annotate(f"{b:.3f}", (m, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(sorted({m for points in lines.values() for m, _ in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the budgets run are labelled
    ax.set_xlabel("pretraining budget (minutes)")
    ax.set_ylabel("held-out bits per character")
    return save(fig, ax, out)


def plot_positions(files: list[str], out: str) -> dict[str, list[tuple[float, float]]]:
    """Bits per character against position (the end of each bucket, doubling), one line per file and
    RoPE scaling, the trained length marked; returns the points of each line by its label."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for path in files:
        r = read_by_position(path)
        name = os.path.splitext(os.path.basename(path))[0]
        for scaling, values in r["scalings"].items():
            ax.plot([b for _, b in r["buckets"]], values, "o-", label=f"{name} {scaling}")
        ax.axvline(r["trained_length"], color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (end of bucket; dashed: the trained length)")
    ax.set_ylabel(r["unit"])
    return save(fig, ax, out)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+",
                        help="run folders (or metrics.jsonl files), or eval_pretrain.py or speedrun.py JSONs")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/<metric>.png)")
    parser.add_argument("--smooth", type=positive_int, default=20, help="moving average window for the train curve")
    parser.add_argument("--metric", default="loss", help="a field of metrics.jsonl: loss, reward, margin, ...")
    parser.add_argument("--x", default="tokens", choices=["tokens", "step"], help="the horizontal axis")
    with one_line_errors():
        args = parser.parse_args(argv)
        if args.runs[0].endswith(".json"):
            if "by_position" in read_result(args.runs[0]):
                plot_positions(args.runs, args.out or os.path.splitext(args.runs[0])[0] + "_by_position.png")
            else:
                plot_budget(args.runs, args.out or os.path.join(os.path.dirname(args.runs[0]), "budget.png"))
            return
        first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
        plot(args.runs, args.out or os.path.join(first, f"{args.metric}.png"), max(1, args.smooth), args.metric,
             args.x)


if __name__ == "__main__":
    main(sys.argv[1:])
