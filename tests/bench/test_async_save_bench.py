"""bench/async_save_bench.py: the summary per mode (blocked time per save, extra wall time per save
against the no-save segments) and the async share of the blocking figures. The benchmark itself runs
by hand (docs/reliability.md, "Async save stall"): speed targets are not timed tests."""

from __future__ import annotations

import os

import pytest

from tests.helpers import script_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "async_save_bench.py")


@pytest.fixture(scope="module")
def bench():
    with script_module(_PATH, "async_save_bench") as module:
        yield module


def test_summary_per_save_and_async_share(bench):
    def seg(mode, wall, blocked, total=()):
        return {"mode": mode, "wall_s": wall, "saves": len(blocked), "blocked_s": list(blocked),
                "save_total_s": list(total or blocked), "polls_s": [0.05] * len(blocked)}

    result = {"world_size": 2, "state_bytes": 300 * 2**20, "steps": 12, "segments": [
        seg("none", 12.0, []), seg("sync", 18.0, [2.0, 2.0, 2.0]), seg("async", 13.5, [0.2, 0.4, 0.3], [3, 3, 3]),
        seg("none", 14.0, []), seg("sync", 19.0, [1.8, 1.9, 2.1]), seg("async", 14.0, [0.3, 0.3, 0.3], [3, 3, 3])]}
    row = bench.summarise(result)
    assert row["state_mib"] == pytest.approx(300) and row["step_s"] == pytest.approx(13.0 / 12)
    assert row["sync_blocked_s"] == pytest.approx(2.0) and row["async_blocked_s"] == pytest.approx(0.3)
    # extra wall per save against the median no-save segment (13 s): sync (5/3, 6/3), async (0.5/3, 1/3)
    assert row["sync_extra_s"] == pytest.approx((5 / 3 + 6 / 3) / 2)
    assert row["async_extra_s"] == pytest.approx((0.5 / 3 + 1 / 3) / 2)
    assert row["async_blocked_share"] == pytest.approx(0.15) and row["async_polls_s"] == pytest.approx(0.05)
    assert row["async_extra_share"] == pytest.approx(row["async_extra_s"] / row["sync_extra_s"])


def test_breakdown_times_only_the_async_segments_per_save(bench):
    import time
    import types

    owner = types.SimpleNamespace(work=lambda seconds: time.sleep(seconds) or seconds)
    timers = bench.Breakdown()
    timers.wrap(owner, "work", "work")
    assert owner.work(0.01) == 0.01 and timers.totals == {}  # inactive: not counted
    timers.active = True
    for seconds in (0.02, 0.05, 0.03):
        owner.work(seconds)
        timers.end_save()
    assert len(timers.per_save) == 3 and all(set(row) == {"work"} for row in timers.per_save)
    median = timers.medians()["work"]
    assert 0.03 <= median < 0.05 + 0.5  # the middle one of 0.02, 0.03, 0.05 s (plus scheduling delay)
