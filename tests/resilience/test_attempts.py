"""resilience/attempts.py: the hang report names the rank that did not arrive, from heartbeats and dumps."""

from __future__ import annotations

import json
import os

from rexmoe_train.resilience import attempts


def _beat(run_dir, rank: int, step: int, section: str = "step", world: int = 4) -> None:
    logs = attempts.attempt_dir(str(run_dir), "logs", "L", 0)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"rank{rank}.heartbeat.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "section": section, "step": step, "time": 0.0, "pid": 1, "host": "h"}))


def _dump(run_dir, rank: int) -> None:
    hang = attempts.attempt_dir(str(run_dir), "hang", "L", 0)
    hang.mkdir(parents=True, exist_ok=True)
    (hang / f"rank{rank}.txt").write_text("stacks")


def test_the_rank_without_a_dump_did_not_arrive(tmp_path):
    for rank in range(4):
        _beat(tmp_path, rank, 6)
        if rank != 2:
            _dump(tmp_path, rank)
    report = attempts.hang_report(str(tmp_path), "L", 0)
    assert report["culprits"] == [2] and report["dumped"] == [0, 1, 3] and report["step"] == 6
    text = (attempts.attempt_dir(str(tmp_path), "hang", "L", 0) / "report.txt").read_text()
    assert "did not arrive: 2" in text


def test_every_rank_dumped_names_the_rank_behind(tmp_path):
    for rank in range(4):
        _beat(tmp_path, rank, 7 if rank != 1 else 6)
        _dump(tmp_path, rank)
    assert attempts.hang_report(str(tmp_path), "L", 0)["culprits"] == [1]
    # the same step: the rank still in an earlier section (step before save) is behind
    _beat(tmp_path, 1, 7, "step")
    for rank in (0, 2, 3):
        _beat(tmp_path, rank, 7, "save")
    assert attempts.hang_report(str(tmp_path), "L", 0)["culprits"] == [1]
    _beat(tmp_path, 1, 7, "save")  # every rank waited at the same place: nobody is named
    assert attempts.hang_report(str(tmp_path), "L", 0)["culprits"] == []


def test_no_dumps_no_report_and_torn_heartbeats_are_skipped(tmp_path):
    assert attempts.hang_report(str(tmp_path), "L", 0) is None
    _beat(tmp_path, 0, 3)
    logs = attempts.attempt_dir(str(tmp_path), "logs", "L", 0)
    (logs / "rank1.heartbeat.json").write_text('{"rank": 1, "st')  # killed mid-write
    assert set(attempts.read_heartbeats(logs)) == {0}


def test_attempt_dir_follows_the_launcher_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REXMOE_LAUNCH_ID", "run7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert attempts.attempt_dir(str(tmp_path), "hang") == tmp_path / "hang" / "run7" / "attempt2"
    monkeypatch.delenv("REXMOE_LAUNCH_ID")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert attempts.attempt_dir(str(tmp_path), "logs") == tmp_path / "logs" / "local" / "attempt0"


def test_subreaper_request_is_accepted_on_linux():
    import subprocess
    import sys

    # in a child, so this test process keeps its own parentage rules
    code = "from rexmoe_train.resilience import attempts; print(attempts.become_subreaper())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sys.platform.startswith("linux"))
    assert os.getpid() > 0


ABORT, PEER, TERM = -6, 77, -15  # NCCL's watchdog aborts (SIGABRT); a peer failure; the agent's SIGTERM


def _beats(steps: dict, world: int = 4) -> dict:
    return {r: {"rank": r, "world_size": world, "section": s[1] if isinstance(s, tuple) else "step",
                "step": s[0] if isinstance(s, tuple) else s, "time": 0.0} for r, s in steps.items()}


def test_when_the_collective_timeout_fires_first_the_rank_they_waited_for_is_named_not_rank_0():
    same = _beats({0: 6, 1: 6, 2: 6, 3: 6})
    # ranks 0, 1, 3 aborted in the collective; rank 2 (hung in its step) was still running
    said = attempts.hung_after_collective_abort(same, {0: ABORT, 1: ABORT, 3: ABORT})
    assert said.startswith("rank 2 hung at step 6; the other ranks aborted in a collective that timed out")
    # ... or was stopped by the agent after the others had died
    said = attempts.hung_after_collective_abort(same, {0: ABORT, 1: ABORT, 2: TERM, 3: PEER})
    assert said.startswith("rank 2 hung at step 6;")
    # every rank aborted: the heartbeats tell (rank 1 never entered step 7, or was still in its step)
    behind = _beats({0: 7, 1: 6, 2: 7, 3: 7})
    assert attempts.hung_after_collective_abort(behind, {r: ABORT for r in range(4)}).startswith("rank 1 hung at step 6;")
    section = _beats({0: (7, "save"), 1: (7, "step"), 2: (7, "save"), 3: (7, "save")})
    assert attempts.hung_after_collective_abort(section, {r: PEER for r in range(4)}).startswith("rank 1 hung at step 7;")
    # nothing tells them apart: said so, no rank blamed
    said = attempts.hung_after_collective_abort(same, {r: ABORT for r in range(4)})
    assert said.startswith("every rank aborted in a collective that timed out (ranks 0, 1, 2, 3)")


def test_a_rank_that_failed_of_its_own_accord_is_left_to_the_usual_rules():
    same = _beats({0: 6, 1: 6, 2: 6, 3: 6})
    assert attempts.hung_after_collective_abort(same, {0: PEER, 1: 1}) is None  # an exception on rank 1
    assert attempts.hung_after_collective_abort(same, {0: PEER, 1: -9}) is None  # SIGKILL (OOM killer)
    assert attempts.hung_after_collective_abort(same, {0: 76, 1: 76, 3: 76}) is None  # the watchdog's
    assert attempts.hung_after_collective_abort(same, {0: TERM}) is None  # no abort at all


def test_the_launchers_summary_names_the_hung_rank(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from rexmoe_train.resilience.launcher import RunPaths, describe_failure

    for rank in range(4):
        _beat(tmp_path, rank, 9)
    failures = {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=ABORT, error_file="<none>") for r in (0, 1, 3)}
    code, what = describe_failure(failures, RunPaths(["run.dir=" + str(tmp_path)]), "L", 0)
    assert code == 76 and what.startswith("rank 2 hung at step 9;"), what
