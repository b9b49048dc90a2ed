import pytest

from stun_lightning.patterns import InvalidSparsityError
from stun_lightning.schedule import InvalidScheduleError, SparsitySchedule


def test_cubic_follows_zhu_and_gupta():
    s = SparsitySchedule("cubic", initial=0.1, final=0.7, start_step=10, end_step=50, update_every=10)
    assert s.sparsity_at(0) == 0.1 and s.sparsity_at(10) == 0.1
    for t in (20, 30, 40):
        assert s.sparsity_at(t) == pytest.approx(0.7 + (0.1 - 0.7) * (1 - (t - 10) / 40) ** 3)
    assert s.sparsity_at(50) == 0.7 and s.sparsity_at(10_000) == 0.7
    # cubic prunes fast first: past the halfway point of the ramp after a quarter of it
    assert s.sparsity_at(20) > 0.1 + (0.7 - 0.1) / 2


def test_linear_and_one_shot():
    lin = SparsitySchedule("linear", initial=0.0, final=0.5, start_step=0, end_step=10, update_every=5)
    assert [lin.sparsity_at(t) for t in (0, 5, 10, 11)] == [0.0, 0.25, 0.5, 0.5]
    one = SparsitySchedule("one_shot", initial=0.0, final=0.5, start_step=4)
    one = one.resolved(0.9, 100)  # final given explicitly: kept
    assert [one.sparsity_at(t) for t in (0, 3, 4, 50)] == [0.0, 0.0, 0.5, 0.5]
    assert one.update_steps() == [4] and one.is_update_step(4) and not one.is_update_step(5)
    assert one.next_update(0) == 4 and one.next_update(5) is None


def test_update_steps_always_end_on_end_step():
    s = SparsitySchedule("cubic", final=0.5, start_step=2, end_step=13, update_every=4)
    assert s.update_steps() == [2, 6, 10, 13]
    assert [t for t in range(20) if s.is_update_step(t)] == s.update_steps()
    assert [s.next_update(t) for t in (0, 2, 3, 7, 11, 13, 14)] == [2, 2, 6, 10, 13, 13, None]
    assert s.sparsity_at(13) == 0.5


def test_resolved_fills_only_what_is_missing():
    s = SparsitySchedule("linear", initial=0.2)
    r = s.resolved(0.6, 40)
    assert (r.final, r.end_step) == (0.6, 40) and (s.final, s.end_step) == (None, None)
    with pytest.raises(InvalidScheduleError, match="resolved"):
        s.sparsity_at(3)
    with pytest.raises(InvalidScheduleError, match="below the initial"):
        s.resolved(0.1, 40)  # the recipe's target under the schedule's initial value


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(initial=0.5, final=0.3), InvalidScheduleError, "below the initial"),
        (dict(kind="exponential"), InvalidScheduleError, "not one of"),
        (dict(start_step=10, end_step=5), InvalidScheduleError, "before start_step"),
        (dict(update_every=0), InvalidScheduleError, "update_every"),
        (dict(final=1.0), InvalidSparsityError, r"\[0, 1\)"),
    ],
)
def test_bad_schedules_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsitySchedule(**kwargs)


def test_training_checks_name_the_fix():
    from stun_lightning.schedule import check_training_schedule

    ramp = SparsitySchedule("cubic", end_step=40, update_every=10)
    check_training_schedule(ramp, needs_stats=True, stats_steps=2, max_steps=40)  # first real update at step 10
    with pytest.raises(InvalidScheduleError, match="start_step >= 2"):
        check_training_schedule(SparsitySchedule("one_shot", start_step=1), needs_stats=True, stats_steps=2)
    check_training_schedule(SparsitySchedule("one_shot", start_step=0), needs_stats=False)  # magnitude needs no batch
    with pytest.raises(InvalidScheduleError, match="overlap"):
        check_training_schedule(ramp, needs_stats=True, stats_steps=11)
    with pytest.raises(InvalidScheduleError, match="max_steps=30"):
        check_training_schedule(ramp, max_steps=30)
    with pytest.raises(InvalidScheduleError, match="one_shot"):
        check_training_schedule(ramp, pattern="2:4")
