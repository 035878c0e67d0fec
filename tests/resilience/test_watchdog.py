"""resilience/watchdog.py: an overrun writes the heartbeat, the stacks of every thread, then exits 76."""

from __future__ import annotations

import json
import time

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import attempt_dir
from rexmoe_train.resilience.watchdog import Watchdog


def _watchdog(tmp_path, budget: float, first: float = 0.0) -> tuple[Watchdog, list]:
    codes: list[int] = []
    dog = Watchdog(str(tmp_path), rank=3, world_size=4, budgets={"step": budget, "eval": None, "save": 5.0},
                   first_budget=first)
    dog.exit = codes.append  # the seam: record the exit code instead of ending pytest
    return dog, codes


def _sleeping_inside_a_step(seconds: float) -> None:
    time.sleep(seconds)


def test_overrun_dumps_every_thread_and_exits_76(tmp_path, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    dog, codes = _watchdog(tmp_path, budget=0.3)
    with dog.section("step", 15):
        _sleeping_inside_a_step(1.5)
    dog.close()
    assert codes == [ExitCode.HUNG]
    dump = (attempt_dir(str(tmp_path), "hang", "t", 0) / "rank3.txt").read_text()
    assert "rank 3 (pid" in dump and "step 15 overran its budget of 0.3 s" in dump
    assert "_sleeping_inside_a_step" in dump  # the main thread's stack, seen from the watchdog thread
    assert "rexmoe-watchdog" in dump or "_watch" in dump  # all threads
    assert "flight recorder:" in dump
    beat = json.loads((attempt_dir(str(tmp_path), "logs", "t", 0) / "rank3.heartbeat.json").read_text())
    assert (beat["rank"], beat["section"], beat["step"], beat["world_size"]) == (3, "step", 15, 4)


def test_sections_within_budget_and_unbudgeted_sections_never_fire(tmp_path, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    dog, codes = _watchdog(tmp_path, budget=0.5, first=0.0)
    for step in range(1, 6):
        with dog.section("step", step):
            time.sleep(0.05)
    with dog.section("eval", 5):  # budget None: no deadline
        time.sleep(0.6)
    time.sleep(0.7)  # idle between sections: no deadline either
    dog.close()
    assert codes == []
    beat = json.loads((attempt_dir(str(tmp_path), "logs", "t", 0) / "rank3.heartbeat.json").read_text())
    assert (beat["section"], beat["step"]) == ("eval", 5)


def test_the_first_section_of_a_process_gets_the_start_up_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    dog, codes = _watchdog(tmp_path, budget=0.2, first=2.0)
    with dog.section("step", 1):  # warm-up: 0.5 s is within max(0.2, 2.0)
        time.sleep(0.5)
    with dog.section("step", 2):
        time.sleep(0.6)
    dog.close()
    assert codes == [ExitCode.HUNG]
