"""Training by time budget: fit a stage's optimizer steps into N minutes so that its learning-rate
schedule always completes, then follow the machine's speed."""
from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING

from babyllama.distributed import all_reduce_max

if TYPE_CHECKING:
    from babyllama.trainer import Trainer


def steps_that_fit(seconds: float, step: int, step_s: float, eval_s: float, eval_interval: int, save_s: float,
                   save_interval: int) -> int:
    """The most optimizer steps after `step` that fit in `seconds`, counting the validations and
    checkpoints they trigger (every eval_interval and save_interval steps) and the final ones."""
    def cost(n: int) -> float:
        end = step + n
        evals = end // eval_interval - step // eval_interval + 1
        saves = end // save_interval - step // save_interval + 1
        return n * step_s + evals * eval_s + saves * save_s

    lo, hi = 0, max(1, int(seconds / step_s) + 1)  # the steps alone overrun at hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    return lo


class TimeBudget:
    """Fits a stage's optimizer steps into time_budget_min minutes counted from the stage's start
    (dist.started). The steps after the first (which pays for compilation) are timed until there are
    enough; one validation and one checkpoint are timed; then max_steps becomes what fits, at most the
    configured max_steps, and the warmup shrinks with it, so the schedule reaches min_lr on its last
    step. The timing goes on, over the most recent steps: the schedule is shortened whenever the steps
    left no longer fit (the machine slowed down), and lengthened, up to the configured max_steps, when
    clearly more fit and most of the schedule is still ahead (a slow spell during the first timing)."""

    MIN_TIMED_STEPS = 5
    RECENT_STEPS = 50  # the speed that later adjustments go by
    LENGTHEN_BY = 1.05  # lengthen only for at least this many more steps...
    LENGTHEN_BEFORE = 0.8  # ...and only before this share of the schedule is done

    def __init__(self, trainer: Trainer):
        self.trainer, self.cfg = trainer, trainer.cfg
        self.on = self.cfg.time_budget_min > 0
        self.seconds = self.cfg.time_budget_min * 60
        self.deadline = trainer.dist.started + self.seconds
        self.margin = 2.0 + 0.05 * self.seconds  # what the estimate cannot see: the exit, slower steps
        self.pending = self.on and not trainer.fitted_to_budget
        self.adjusting = self.pending  # a resumed run keeps the schedule it was fitted to
        self.cap = trainer.max_steps  # the configured max_steps
        self.first_step = trainer.step + 1
        self.timed_s, self.timed_steps = 0.0, 0
        self.recent: deque[float] = deque(maxlen=self.RECENT_STEPS)
        self.eval_s = self.save_s = 0.0

    def add_step(self, step: int, seconds: float) -> None:
        if self.on and step > self.first_step:
            self.timed_s += seconds
            self.timed_steps += 1
            self.recent.append(seconds)

    def ready(self) -> bool:
        """Enough steps are timed to fit the schedule."""
        enough_s = min(60.0, 0.1 * self.seconds)
        return self.pending and self.timed_steps >= self.MIN_TIMED_STEPS and self.timed_s >= enough_s

    def stop_at(self) -> float:
        """When to stop at the latest, leaving time for the last checkpoint; inf without a budget."""
        return self.deadline - self.save_s - 1.0 if self.on else math.inf

    def _steps_left(self, step_s: float, margin: float) -> int:
        left = all_reduce_max(self.deadline - time.time(), self.trainer.dist)
        return steps_that_fit(left - margin, self.trainer.step, step_s, self.eval_s, self.cfg.eval_interval,
                              self.save_s, self.cfg.save_interval)

    def fit(self, eval_s: float, save_s: float) -> str:
        """Set max_steps and warmup_steps from the timings; returns the line that says so."""
        trainer, dist = self.trainer, self.trainer.dist
        self.eval_s, self.save_s = all_reduce_max(eval_s, dist), all_reduce_max(save_s, dist)
        step_s = all_reduce_max(self.timed_s / self.timed_steps, dist)
        n = self._steps_left(step_s, self.margin)
        trainer.max_steps = max(trainer.step + 1, min(self.cap, trainer.step + n))
        # The warmup shrinks with the schedule, but need not go below a tenth of it.
        warmup, steps = trainer.warmup_steps, trainer.max_steps
        trainer.warmup_steps = min(warmup, max(1, round(warmup * steps / self.cap), steps // 10))
        trainer.fitted_to_budget, self.pending = True, False
        return (f"time budget {self.cfg.time_budget_min:g} min: {step_s:.3f} s a step, validation "
                f"{self.eval_s:.1f} s, checkpoint {self.save_s:.1f} s, {self.deadline - time.time():.0f} s left -> "
                f"{trainer.max_steps} steps (of at most {self.cap}), warmup {trainer.warmup_steps}")

    def adjust_to_speed(self) -> str | None:
        """After the fit: end the schedule earlier if the steps left no longer fit at the recent speed,
        or later if clearly more fit. Returns the line that says so, or None. Every rank calls it on
        the same steps."""
        if not self.adjusting or self.pending or not self.recent:
            return None
        trainer = self.trainer
        step_s = all_reduce_max(sum(self.recent) / len(self.recent), trainer.dist)
        fits = trainer.step + self._steps_left(step_s, self.margin / 2)
        if fits < trainer.max_steps:
            trainer.max_steps = max(trainer.step + 1, fits)
        elif trainer.step < self.LENGTHEN_BEFORE * trainer.max_steps and trainer.max_steps < self.cap:
            fits = min(self.cap, trainer.step + self._steps_left(step_s, self.margin))
            if fits < self.LENGTHEN_BY * trainer.max_steps:
                return None
            trainer.max_steps = fits
        else:
            return None
        return f"time budget: steps take {step_s:.3f} s now, the schedule ends at step {trainer.max_steps}"
