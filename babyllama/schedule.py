"""The learning-rate schedule of a training stage: how many optimizer steps, a linear warmup, then a
decay to min_lr at the last step. The trainer owns it, saves and restores it; a time budget
(budget.py) may fit its length to the minutes given."""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int, shape: str = "cosine",
          decay_share: float = 0.2) -> float:
    """Linear warmup over warmup_steps optimizer steps, then a decay that reaches min_lr at the last step
    (max_steps - 1): cosine, linear, or wsd (the peak rate, then linear over the last decay_share of the
    steps after warmup)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps - 1:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps)
    if shape == "linear":
        left = 1.0 - progress
    elif shape == "wsd":
        left = min(1.0, (1.0 - progress) / decay_share)
    else:
        left = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + left * (lr - min_lr)


def window_length_at(step: int, warmup_steps: int, max_seq_len: int) -> int:
    """Sequence-length warmup: the training windows' length at optimizer step `step` (from 0), a quarter of
    max_seq_len at first, a quarter more after each third of warmup_steps, all of it from warmup_steps on
    (four lengths: each compiles a graph of its own)."""
    if step >= warmup_steps:
        return max_seq_len
    return max(1, max_seq_len * (1 + 3 * step // warmup_steps) // 4)


@dataclass
class Schedule:
    max_steps: int  # optimizer steps in all
    warmup_steps: int
    lr: float  # the peak
    min_lr: float  # at the last step
    shape: str = "cosine"  # the decay: cosine, linear or wsd
    decay_share: float = 0.2  # wsd: the share of the steps after warmup spent decaying
    budgeted: bool = False  # a time budget will fit max_steps (at most the configured one)
    fitted_to_budget: bool = False  # max_steps and warmup_steps have been fitted to the budget

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.max_steps, self.shape, self.decay_share)

    def fit_to(self, max_steps: int, configured_steps: int) -> None:
        """Shorten the schedule to max_steps (of configured_steps); the warmup shrinks with it, but need
        not go below a tenth of the schedule."""
        warmup = self.warmup_steps
        self.max_steps = max_steps
        self.warmup_steps = min(warmup, max(1, round(warmup * max_steps / configured_steps), max_steps // 10))
        self.fitted_to_budget = True

    def state_dict(self) -> dict:
        return {"max_steps": self.max_steps, "warmup_steps": self.warmup_steps,
                "fitted_to_budget": self.fitted_to_budget}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run under a time budget keeps the steps fitted before (a second fit would see fewer
        minutes left and cut the schedule short); otherwise the configured schedule stands."""
        if self.budgeted and state.get("fitted_to_budget"):
            self.max_steps, self.warmup_steps = state["max_steps"], state["warmup_steps"]
            self.fitted_to_budget = True
