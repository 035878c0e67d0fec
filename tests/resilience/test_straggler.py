"""resilience/straggler.py: the busy-time rule (pure), and the collective clock on a real gloo world."""

from __future__ import annotations

import random

import torch

from rexmoe_train.resilience.straggler import CollectiveClock, StragglerReport


def _report(world: int = 4) -> StragglerReport:
    return StragglerReport(0, world, threshold=0.25, min_excess_s=0.05, intervals=5)


def test_a_rank_200ms_slower_is_named_in_four_of_five_intervals_and_noise_is_not():
    rng = random.Random(0)
    report = _report()
    for _ in range(50):  # clean: +-10 % noise around 0.3 s
        fields = report.judge([0.3 * rng.uniform(0.9, 1.1) for _ in range(4)])
        assert fields["straggler"] == []
    named_at = None
    for interval in range(1, 7):
        busy = [0.3 * rng.uniform(0.9, 1.1) for _ in range(4)]
        busy[2] += 0.2
        fields = report.judge(busy)
        if fields["straggler"] and named_at is None:
            named_at = interval
            assert report.newly_named() == [2]
        assert fields["busy_s_max_rank"] == 2
    assert named_at == 4 and fields["straggler"] == [2]
    assert report.judge([0.3] * 4)["straggler"] == [2]  # one fast interval: still 4 of the last 5
    assert report.judge([0.3] * 4)["straggler"] == []  # recovered


def test_one_delayed_interval_neither_hides_nor_makes_a_straggler():
    report = _report()
    pattern = [True, True, False, True, True]  # rank 1 slow, except one interval where rank 0 is delayed
    for slow in pattern:
        busy = [0.3, 0.5 if slow else 0.3, 0.3, 0.3]
        if not slow:
            busy[0] = 0.6
        fields = report.judge(busy)
    assert fields["straggler"] == [1]
    for _ in range(5):  # rank 0 delayed in one interval of every five: never named
        fields = report.judge([0.3, 0.3, 0.3, 0.3])
    assert 0 not in fields["straggler"]


def test_tiny_steps_are_not_flagged_below_the_absolute_floor():
    report = _report()
    for _ in range(10):
        assert report.judge([0.040, 0.040, 0.040, 0.085])["straggler"] == []  # +110 % but only 45 ms


def test_collective_clock_counts_blocking_collectives_once(megatron_world):
    import torch.distributed as dist

    CollectiveClock.install()
    CollectiveClock.install()  # idempotent: not wrapped twice
    assert getattr(dist.all_reduce, "_rexmoe_timed", False)
    before = CollectiveClock.waited
    dist.all_reduce(torch.ones(4))
    dist.barrier()
    assert CollectiveClock.waited > before
    report = StragglerReport(0, 1, 0.25, 0.05, 5)
    report.step_started()
    report.step_ended(0.5)
    fields = report.gather()
    assert fields["busy_s_max_rank"] == 0 and 0 < fields["busy_s_median"] <= 0.5
