"""Experiment trackers beside metrics.jsonl, which stays the record: TensorBoard, Weights & Biases and
SwanLab, each imported only when `--log_to` names it. They write on this machine (an event file, an
offline wandb run, a local SwanLab run) unless the user's own settings ask for their service
(WANDB_MODE=online after `wandb login`; SWANLAB_MODE=cloud after `swanlab login`)."""
from __future__ import annotations

import os
from typing import Any, Protocol

from babyllama.common import require


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _import(tracker: str) -> Any:
    return require("torch.utils.tensorboard" if tracker == "tensorboard" else tracker, f"--log_to={tracker}",
                   package=tracker, also="all three: pip install -r requirements-trackers.txt")


class TensorBoard:
    """An event file in out_dir/tensorboard (`tensorboard --logdir out_dir`)."""

    def __init__(self, out_dir: str, run_name: str, settings: dict[str, Any]):
        self.writer = _import("tensorboard").SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        self.writer.add_text("settings", "\n".join(f"    {k} = {v!r}" for k, v in settings.items()))
        self.writer.add_text("run", run_name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A wandb run in out_dir/wandb: offline unless WANDB_MODE says otherwise."""

    def __init__(self, out_dir: str, run_name: str, settings: dict[str, Any]):
        wandb = _import("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "baby-llama2-chinese"), name=run_name,
                              dir=out_dir, config=settings, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLab:
    """A SwanLab run in out_dir/swanlog: local unless SWANLAB_MODE says otherwise."""

    def __init__(self, out_dir: str, run_name: str, settings: dict[str, Any]):
        swanlab = _import("swanlab")
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME", "baby-llama2-chinese"),
                                experiment_name=run_name, config=settings,
                                logdir=os.path.join(out_dir, "swanlog"), mode=os.environ.get("SWANLAB_MODE", "local"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "swanlab": SwanLab}


def open_trackers(log_to: str, out_dir: str, run_name: str, settings: dict[str, Any], master: bool) -> list[Tracker]:
    """The trackers --log_to names (comma-separated), started with the run's name and settings on the
    master process; every process checks that their packages import, so that all stop together."""
    names = list(dict.fromkeys(name.strip() for name in log_to.split(",") if name.strip()))
    for name in names:
        _import(name)
    return [KINDS[name](out_dir, run_name, settings) for name in names] if master else []


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers, but its step (the trackers' own axis)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
