import subprocess
import sys

from conftest import ROOT

from babyllama.budget import TimeBudget, stage_start_time, steps_that_fit
from babyllama.schedule import Schedule


def test_steps_that_fit_count_validations_and_checkpoints():
    # 100 s, 1 s a step, nothing else: 100 steps.
    assert steps_that_fit(100, 0, 1.0, 0.0, 10, 0.0, 10) == 100
    # A 5 s validation every 10 steps and at the end: n + 5 * (n // 10 + 1) <= 100 -> n = 65.
    assert steps_that_fit(100, 0, 1.0, 5.0, 10, 0.0, 1000) == 65
    # Checkpoints too, counted from step 7 on: n + 2 * ((7 + n) // 20 + 1) <= 50 -> n = 44.
    assert steps_that_fit(50, 7, 1.0, 0.0, 1000, 2.0, 20) == 44
    assert steps_that_fit(1, 0, 5.0, 0.0, 10, 0.0, 10) == 0


def test_time_budget_follows_the_speed_both_ways():
    """After the fit, a slower machine shortens the schedule at once; a faster one lengthens it (up to
    the configured max_steps) only while most of the schedule is ahead."""
    now = [0.0]
    schedule = Schedule(max_steps=1000, warmup_steps=10, lr=1.0, min_lr=0.1, budgeted=True)
    budget = TimeBudget(2, schedule, eval_interval=10**6, save_interval=10**6, started=0.0, clock=lambda: now[0])
    for step in range(1, 12):  # the first step (compilation) is not timed
        budget.add_step(step, 0.5)
    assert not budget.ready()  # 5 s timed: less than a tenth of the budget
    for step in range(12, 32):
        budget.add_step(step, 0.5)
    now[0] = 16.0
    assert budget.ready()
    budget.fit(31, eval_s=0.0, save_s=0.0)
    assert schedule.max_steps == 31 + int((120 - 16 - 3.2) / 0.5)  # (120 s less 16 s gone and the 3.2 s margin)
    fitted = schedule.max_steps
    budget.recent.extend([1.0] * 50)  # twice as slow: shortened
    assert budget.adjust_to_speed(31) is not None and schedule.max_steps < 0.6 * fitted
    shortened = schedule.max_steps
    budget.recent.extend([0.1] * 50)  # much faster, early in the schedule: lengthened, within the cap
    assert budget.adjust_to_speed(31) is not None and shortened < schedule.max_steps <= 1000
    late = int(0.9 * schedule.max_steps)
    longest = schedule.max_steps
    budget.recent.extend([0.01] * 50)  # faster still, but near the end: kept
    assert budget.adjust_to_speed(late) is None and schedule.max_steps == longest


def simulate(minutes: float, step_s: float, eval_s: float, save_s: float, slow_from: int = 0,
             slow_until: int = 10**9) -> tuple[float, int]:
    """The training loop's use of the budget on a simulated clock, steps twice as slow from slow_from to
    slow_until: (seconds used, steps run)."""
    now = [3.0]  # the imports and the data
    schedule = Schedule(max_steps=10**6, warmup_steps=100, lr=1.0, min_lr=0.1, budgeted=True)
    budget = TimeBudget(minutes, schedule, eval_interval=100, save_interval=500, started=0.0, clock=lambda: now[0])
    step = 0
    while step < schedule.max_steps:
        slow = slow_from and slow_from <= step < slow_until
        seconds = step_s * (2 if slow else 1) + (5.0 if step == 0 else 0.0)
        now[0] += seconds
        step += 1
        budget.add_step(step, seconds)
        if step % 10 == 0:
            budget.adjust_to_speed(step)
        if step % 100 == 0 or step == schedule.max_steps or budget.ready():
            now[0] += eval_s
        if step % 500 == 0 or step == schedule.max_steps or budget.ready():
            now[0] += save_s
            if budget.ready():
                budget.fit(step, eval_s, save_s)
        if now[0] > budget.stop_at():
            break
    return now[0], step


def test_a_budget_is_used_and_not_overrun():
    for minutes, step_s, slow_from in ((1, 0.2, 0), (10, 0.05, 0), (10, 0.05, 3000)):
        used, steps = simulate(minutes, step_s, eval_s=1.0, save_s=0.5, slow_from=slow_from)
        assert 0.8 * 60 * minutes <= used <= 60 * minutes, (minutes, step_s, slow_from, used, steps)


def test_a_slow_spell_early_leaves_little_of_the_budget_unused():
    """A spell of slow steps shortens the schedule; when the speed comes back while the schedule is still
    in its first part, it is lengthened again, so the run ends near the budget, not a spell's worth early."""
    used, _ = simulate(10, 0.05, eval_s=1.0, save_s=0.5, slow_from=3000, slow_until=3400)
    assert 0.98 * 600 <= used <= 600, used


def test_a_command_counts_from_its_start_and_a_test_from_now():
    import time
    assert abs(stage_start_time() - time.time()) < 1.0  # pytest is not a command of the repository
    # A process whose main file is a command at the root (set by hand: `python -c` has none), 1.5 s old.
    code = ("import os, sys, time; time.sleep(1.5); from babyllama.budget import ROOT, stage_start_time; "
            "sys.modules['__main__'].__file__ = os.path.join(ROOT, 'pretrain.py'); "
            "print(time.time() - stage_start_time())")
    waited = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  cwd=ROOT).stdout)
    assert waited >= 1.5  # counted from the process start, before the sleep and the imports
