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


class _ScriptedEvent:
    """A CUDA event whose device time the test sets: ``now`` when recorded, unless the test moves it."""

    now = 0.0
    made = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        _ScriptedEvent.made += 1
        self.at, self.done = None, True

    def record(self, stream=None) -> None:
        self.at, self.done = _ScriptedEvent.now, True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end) -> float:
        assert self.done and end.done, "read before the stream passed it"
        return (end.at - self.at) * 1e3


def test_the_device_clock_subtracts_the_device_time_in_collectives(megatron_world, monkeypatch):
    """NCCL: the host returns from a collective at once; the device events around it span the wait."""
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "Event", _ScriptedEvent)
    monkeypatch.setattr(CollectiveClock, "_pool", [])
    report = StragglerReport(0, 1, 0.25, 0.05, 5, on_device=True)
    try:
        assert CollectiveClock.on_device
        for step in range(3):
            _ScriptedEvent.now = 10.0 * step
            report.step_started()
            _ScriptedEvent.now += 0.2  # compute
            dist.all_reduce(torch.ones(2))  # recorded at +0.2 ...
            report_span = CollectiveClock.spans[-1]
            report_span[1].at = _ScriptedEvent.now + 0.5  # ... the stream passes its end 0.5 s later
            report_span[1].done = step < 2  # the last step's collective still runs on the device
            _ScriptedEvent.now += 0.5 + 0.1  # the rest of the step after the wait
            report.step_ended(elapsed_s=0.01)  # the host's time: ignored by the device clock
            report._recorded[-1][1].done = step < 2  # the stream passes the step's end after the collective
        report.step_started()  # reads back the two finished steps, not the running one
        assert report._steps == 2 and abs(report._busy - 0.6) < 1e-9
        vector = report.local_vector()  # waits for the third
        assert abs(float(vector[0]) - 0.3) < 1e-9  # (0.2 + 0.1) busy per step, the 0.5 s wait subtracted
        made = _ScriptedEvent.made
        report.step_ended(0.0)
        report.step_started()
        dist.all_reduce(torch.ones(2))
        assert _ScriptedEvent.made == made  # events are reused once read back
    finally:
        CollectiveClock.on_device = False
        CollectiveClock.take_spans()
