"""rexmoe_train/checkpoint/faults.py: the fault-injection seam does nothing until a hook is set, and
then sees every named point with its step."""

from __future__ import annotations

from rexmoe_train.checkpoint import faults


def test_points_reach_the_hook_only_while_one_is_set():
    seen = []
    faults.fault_point("start", 3)  # no hook: nothing happens
    faults.set_fault_hook(lambda point, step: seen.append((point, step)))
    try:
        for point in (*faults.SAVE_POINTS, *faults.WRITER_POINTS):
            faults.fault_point(point, 7)
    finally:
        faults.set_fault_hook(None)
    faults.fault_point("start", 8)
    assert seen == [(p, 7) for p in (*faults.SAVE_POINTS, *faults.WRITER_POINTS)]
    assert len(set(faults.SAVE_POINTS)) == len(faults.SAVE_POINTS) == 8
