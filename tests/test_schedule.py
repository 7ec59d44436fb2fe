import pytest

from babyllama.schedule import Schedule, lr_at, window_length_at


def test_cosine_schedule():
    assert lr_at(0, 1.0, 0.1, 10, 101) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, 10, 101) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 0.1, 10, 101) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 101) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 0.1, 10, 101) == pytest.approx(0.1)  # the last step is at min_lr
    assert lr_at(99, 1.0, 0.1, 10, 101) > 0.1
    assert lr_at(500, 1.0, 0.1, 10, 101) == pytest.approx(0.1)


def test_linear_and_warmup_stable_decay_schedules():
    # After 10 warmup steps, 90 steps of decay (steps 10..100) end at min_lr on step 100.
    assert lr_at(55, 1.0, 0.1, 10, 101, "linear") == pytest.approx(0.55)
    assert lr_at(10, 1.0, 0.0, 10, 101, "linear") == pytest.approx(1.0)
    assert lr_at(100, 1.0, 0.0, 10, 101, "linear") == 0.0
    assert lr_at(80, 1.0, 0.0, 10, 101, "wsd") == pytest.approx(1.0)  # flat for 80% of the decay steps
    assert lr_at(91, 1.0, 0.0, 10, 101, "wsd") == pytest.approx(0.5)  # then linear over the last 20%
    assert lr_at(100, 1.0, 0.0, 10, 101, "wsd") == 0.0
    assert lr_at(5, 1.0, 0.0, 10, 101, "wsd") == lr_at(5, 1.0, 0.0, 10, 101)  # the same warmup
    # A longer decay: flat for the first half of the decay steps, then linear over the second.
    assert lr_at(55, 1.0, 0.0, 10, 101, "wsd", decay_share=0.5) == pytest.approx(1.0)
    assert lr_at(77.5, 1.0, 0.0, 10, 101, "wsd", decay_share=0.5) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 0.0, 10, 101, "wsd", decay_share=0.5) == 0.0
    assert Schedule(101, 10, 1.0, 0.0, "wsd", decay_share=0.5).lr_at(77) == lr_at(77, 1.0, 0.0, 10, 101, "wsd", 0.5)


def test_fitting_shrinks_the_warmup_with_the_schedule():
    schedule = Schedule(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1, budgeted=True)
    schedule.fit_to(200, 1000)
    assert (schedule.max_steps, schedule.warmup_steps, schedule.fitted_to_budget) == (200, 20, True)
    assert schedule.lr_at(199) == pytest.approx(0.1)  # the fitted schedule still ends at min_lr
    tiny = Schedule(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1)
    tiny.fit_to(30, 1000)
    assert tiny.warmup_steps == 3  # a tenth of the schedule, not 100 * 30 / 1000 rounded down to below it


def test_a_fitted_schedule_is_restored_only_under_a_budget():
    fitted = Schedule(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1, budgeted=True)
    fitted.fit_to(200, 1000)
    resumed = Schedule(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1, budgeted=True)
    resumed.load_state_dict(fitted.state_dict())
    assert (resumed.max_steps, resumed.warmup_steps, resumed.fitted_to_budget) == (200, 20, True)
    unbudgeted = Schedule(max_steps=1000, warmup_steps=100, lr=1.0, min_lr=0.1)
    unbudgeted.load_state_dict(fitted.state_dict())  # resumed without --time_budget_min: the configured one
    assert (unbudgeted.max_steps, unbudgeted.warmup_steps, unbudgeted.fitted_to_budget) == (1000, 100, False)


def test_window_length_grows_by_quarters_over_the_warmup():
    assert [window_length_at(s, 300, 256) for s in (0, 99, 100, 199, 200, 299, 300, 5000)] == \
        [64, 64, 128, 128, 192, 192, 256, 256]
    assert [window_length_at(s, 3, 32) for s in range(4)] == [8, 16, 24, 32]
    assert window_length_at(0, 0, 256) == 256  # off
    assert window_length_at(0, 10, 2) == 1  # never an empty window
