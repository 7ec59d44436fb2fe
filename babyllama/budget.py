"""Training by time budget: fit a stage's optimizer steps into N minutes so that its learning-rate
schedule always completes, then follow the machine's speed."""
from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable

from babyllama.schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_start_time() -> float:
    """When this stage began (time.time() scale): the start of this process when it runs a command of
    this repository (python pretrain.py, or torchrun's workers), so that a budget counts the imports and
    the loading of the data; now otherwise (a test session or a notebook calling a command's main)."""
    now = time.time()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file or os.path.dirname(os.path.abspath(main_file)) != ROOT:
        return now
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux
        return now
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return started if started <= now else now


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
    """Fits a schedule's optimizer steps into `minutes` counted from the stage's start. The steps after
    the first (which pays for compilation) are timed until there are enough; one validation and one
    checkpoint are timed; then the schedule is fitted: max_steps becomes what fits, at most the
    configured max_steps, and the warmup shrinks with it, so the schedule reaches min_lr on its last
    step. The timing goes on, over the most recent steps: the schedule is shortened whenever the steps
    left no longer fit (the machine slowed down), and lengthened, up to the configured max_steps, when
    more fit and most of the schedule is still ahead (a slow spell during the first timing or after it).
    It changes the schedule only. reduce_max combines a number over the processes (every process
    must then call it on the same steps)."""

    MIN_TIMED_STEPS = 5
    RECENT_STEPS = 50  # the speed that later adjustments go by
    LENGTHEN_BY = 1.01  # lengthen only for at least this many more steps...
    LENGTHEN_BEFORE = 0.8  # ...and only before this share of the schedule is done

    def __init__(self, minutes: float, schedule: Schedule, *, eval_interval: int, save_interval: int,
                 step: int = 0, reduce_max: Callable[[float], float] = float, started: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.minutes, self.schedule, self.clock = minutes, schedule, clock
        self.eval_interval, self.save_interval = eval_interval, save_interval
        self.reduce_max = reduce_max
        self.on = minutes > 0
        self.seconds = minutes * 60
        self.deadline = (stage_start_time() if started is None else started) + self.seconds
        self.margin = 2.0 + 0.01 * self.seconds  # what the estimate cannot see: the exit, slower steps
        self.pending = self.on and not schedule.fitted_to_budget
        self.adjusting = self.pending  # a resumed run keeps the schedule it was fitted to
        self.cap = schedule.max_steps  # the configured max_steps
        self.first_step = step + 1
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

    def _steps_left(self, step: int, step_s: float, margin: float) -> int:
        left = self.reduce_max(self.deadline - self.clock())
        return steps_that_fit(left - margin, step, step_s, self.eval_s, self.eval_interval,
                              self.save_s, self.save_interval)

    def fit(self, step: int, eval_s: float, save_s: float) -> str:
        """Fit the schedule from the timings, at optimizer step `step`; returns the line that says so."""
        self.eval_s, self.save_s = self.reduce_max(eval_s), self.reduce_max(save_s)
        step_s = self.reduce_max(self.timed_s / self.timed_steps)
        n = self._steps_left(step, step_s, self.margin)
        self.schedule.fit_to(max(step + 1, min(self.cap, step + n)), self.cap)
        self.pending = False
        return (f"time budget {self.minutes:g} min: {step_s:.3f} s a step, validation "
                f"{self.eval_s:.1f} s, checkpoint {self.save_s:.1f} s, {self.deadline - self.clock():.0f} s left -> "
                f"{self.schedule.max_steps} steps (of at most {self.cap}), warmup {self.schedule.warmup_steps}")

    def spent_before_fit(self, step: int) -> str:
        """The line for a budget that ran out before enough steps were timed to fit the schedule."""
        return (f"time budget {self.minutes:g} min spent at step {step}, before {self.MIN_TIMED_STEPS} steps could be "
                f"timed (start-up and compilation took most of it): the learning rate never decayed; give a larger "
                f"--time_budget_min")

    def adjust_to_speed(self, step: int) -> str | None:
        """After the fit: end the schedule earlier if the steps left no longer fit at the recent speed,
        or later if more fit. Returns the line that says so, or None."""
        if not self.adjusting or self.pending or not self.recent:
            return None
        schedule = self.schedule
        step_s = self.reduce_max(sum(self.recent) / len(self.recent))
        fits = step + self._steps_left(step, step_s, self.margin / 2)
        if fits < schedule.max_steps:
            schedule.max_steps = max(step + 1, fits)
        elif step < self.LENGTHEN_BEFORE * schedule.max_steps and schedule.max_steps < self.cap:
            fits = min(self.cap, step + self._steps_left(step, step_s, self.margin))
            if fits < self.LENGTHEN_BY * schedule.max_steps:
                return None
            schedule.max_steps = fits
        else:
            return None
        return f"time budget: steps take {step_s:.3f} s now, the schedule ends at step {schedule.max_steps}"
