"""cli/launch.py (the agent logic: resilience/launcher.py): the summary line names the cause among the
failed ranks and the resume point. (The launcher end to end: tests/resilience/.)"""

from __future__ import annotations

import json
import signal

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from rexmoe_train.cli.launch import RunPaths, describe_failure
from rexmoe_train.resilience.attempts import attempt_dir


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<none>")


def _paths(tmp_path, step=None) -> RunPaths:
    paths = RunPaths(["run.dir=" + str(tmp_path)])
    assert paths.run_dir == str(tmp_path) and paths.save == tmp_path / "checkpoints"
    if step is not None:
        paths.save.mkdir(parents=True, exist_ok=True)
        (paths.save / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")
    return paths


def _beats(tmp_path, steps: dict) -> None:
    logs = attempt_dir(str(tmp_path), "logs", "L", 0)
    logs.mkdir(parents=True, exist_ok=True)
    for rank, step in steps.items():
        (logs / f"rank{rank}.heartbeat.json").write_text(json.dumps(
            {"rank": rank, "world_size": 4, "section": "step", "step": step, "time": 0.0}))


def test_a_killed_rank_is_the_cause_not_the_peers_it_took_down(tmp_path):
    paths = _paths(tmp_path, step=10)
    _beats(tmp_path, {0: 15, 1: 15, 2: 15, 3: 15})
    failures = {0: _failure(0, 77), 1: _failure(1, -signal.SIGKILL), 2: _failure(2, -signal.SIGTERM)}
    code, what = describe_failure(failures, paths, "L", 0)
    assert (code, what) == (-signal.SIGKILL, "rank 1 died (SIGKILL) at step 15")
    assert paths.resume_point() == "iter_0000010"


def test_an_exception_names_its_message_and_traceback(tmp_path):
    paths = _paths(tmp_path)
    logs = attempt_dir(str(tmp_path), "logs", "L", 0)
    logs.mkdir(parents=True)
    (logs / "rank3.fate.json").write_text(json.dumps(
        {"rank": 3, "step": 2, "what": "RuntimeError: injected", "traceback": "T"}))
    code, what = describe_failure({3: _failure(3, 1), 0: _failure(0, 77)}, paths, "L", 0)
    assert (code, what) == (1, "rank 3 failed (RuntimeError: injected; traceback: T) at step 2")
    assert paths.resume_point() == "the start (no checkpoint yet)"


def test_a_hang_names_the_rank_that_did_not_arrive(tmp_path):
    paths = _paths(tmp_path, step=5)
    _beats(tmp_path, {0: 6, 1: 6, 2: 6, 3: 6})
    hang = attempt_dir(str(tmp_path), "hang", "L", 0)
    hang.mkdir(parents=True)
    for rank in (0, 1, 3):
        (hang / f"rank{rank}.txt").write_text("stacks")
    failures = {0: _failure(0, 76), 1: _failure(1, 76), 3: _failure(3, 76)}
    code, what = describe_failure(failures, paths, "L", 0)
    assert code == 76 and what.startswith("rank 2 hung; the other ranks' stacks are in ") and what.endswith("at step 6")
    assert "did not arrive: 2" in (hang / "report.txt").read_text()


def test_codes_that_a_restart_cannot_help_are_named(tmp_path):
    code, what = describe_failure({0: _failure(0, 75), 1: _failure(1, 75)}, _paths(tmp_path), "L", 0)
    assert (code, what) == (75, "rank 0 exited 75 (pre-empted, checkpoint saved)")


def test_an_error_a_restart_cannot_fix_is_summarised_by_its_own_line(tmp_path, monkeypatch):
    """Exit 2 with the worker's line (written where torch's agent reads it): the summary is that line,
    which says what to change, not "rank 1 exited 2 ... rerun to resume"."""
    from rexmoe_train.resilience.launcher import summary_tail, write_error_file

    line = f"config error: run.dir='{tmp_path}' is in use by pid 7 on host h; choose another run.dir"
    error_file = tmp_path / "torchelastic" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert write_error_file(line)
    failures = {1: ProcessFailure(local_rank=1, pid=1001, exitcode=2, error_file=str(error_file)),
                0: _failure(0, -signal.SIGTERM)}
    code, what = describe_failure(failures, _paths(tmp_path, step=4), "L", 0)
    assert (code, what) == (2, f"{line} (rank 1, exit 2)")
    assert summary_tail(code, 0, 3, "iter_0000004") == "not restarted: a restart would fail the same way"
    assert summary_tail(1, 2, 3, "iter_0000004") == "restart 2/3 resumes from iter_0000004"
    assert summary_tail(129, 0, 3, "iter_0000004") == "not restarted; rerun to resume from iter_0000004"
