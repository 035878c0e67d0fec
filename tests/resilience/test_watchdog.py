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


def test_the_flight_recorder_dump_follows_the_backend_and_keeps_completed_entries(tmp_path, monkeypatch):
    """NCCL collectives are in ProcessGroupNCCL's recorder (``_dump_nccl_trace_json``, CUDA builds only),
    gloo's in the generic one; both are asked for every entry (onlyActive=False), the completed ones
    too: the last completed sequence id per group is what shows which rank stopped issuing."""
    import torch._C._distributed_c10d as c10d

    from rexmoe_train.resilience import watchdog

    calls = []

    def recorder(name):
        def dump(include_collectives, only_active):
            calls.append((name, include_collectives, only_active))
            return b'{"entries": []}'

        return dump

    monkeypatch.setattr(c10d, "_dump_nccl_trace_json", recorder("nccl"), raising=False)
    monkeypatch.setattr(c10d, "_dump_fr_trace_json", recorder("generic"))
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "16")
    said = watchdog._dump_flight_recorder(tmp_path / "nccl.json", "nccl")
    assert calls == [("nccl", True, False)] and "_dump_nccl_trace_json" in said
    assert (tmp_path / "nccl.json").read_bytes() == b'{"entries": []}'
    watchdog._dump_flight_recorder(tmp_path / "gloo.json", "gloo")
    assert calls[1:] == [("generic", True, False)]
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "0")
    assert watchdog._dump_flight_recorder(tmp_path / "off.json", "nccl").startswith("off")


def test_the_gloo_path_dumps_a_real_flight_recorder(tmp_path):
    import subprocess
    import sys

    # a fresh process: the recorder's size is read when the first group is made
    code = (
        "import os, sys, tempfile\n"
        "os.environ['TORCH_FR_BUFFER_SIZE'] = '64'\n"
        "import torch, torch.distributed as dist\n"
        "from pathlib import Path\n"
        "from rexmoe_train.resilience.watchdog import _dump_flight_recorder\n"
        "dist.init_process_group('gloo', store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)\n"
        "dist.all_reduce(torch.ones(3))\n"
        "print(_dump_flight_recorder(Path(sys.argv[1])))\n")
    path = tmp_path / "rank0.flight_recorder.json"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_dump_fr_trace_json" in out.stdout
    entries = json.loads(path.read_text())["entries"]
    assert [e["profiling_name"] for e in entries] == ["gloo:all_reduce"]


def test_after_start_up_a_first_section_gets_its_own_budget(tmp_path, monkeypatch):
    """The start-up budget is for sections under the start-up collective timeout; an evaluation first
    run after the first step is under the training timeout, which its own budget is below."""
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "t")
    codes: list[int] = []
    dog = Watchdog(str(tmp_path), rank=0, world_size=2, budgets={"step": 5.0, "eval": 0.2, "save": None},
                   first_budget=3.0)
    dog.exit = codes.append
    with dog.section("step", 1):
        pass
    dog.end_start_up()
    with dog.section("eval", 1):  # the first eval of the process, but start-up is over: 0.2 s, not 3 s
        time.sleep(0.8)
    dog.close()
    assert codes == [ExitCode.HUNG]
