"""resilience/launcher.py: the torch internals it relies on exist, the reaper and the stopped-worker
check (psutil), and two launches end to end: an error a restart cannot fix (the run dir locked by
another run) is not restarted and summarised by its own line; SIGHUP to the launcher's process group
(a closed terminal) makes the workers save at their step boundary and exits 129."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience import launcher
from tests.helpers import finish_session

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreaper, process states")


def test_every_private_torch_name_the_agent_uses_exists(monkeypatch):
    import torch

    assert launcher.missing_torch_names() == [], torch.__version__
    assert torch.__version__.split("+")[0] in launcher.TORCH_CHECKED_ON or launcher.TORCH_CHECKED_ON
    bogus = ("torch.distributed.elastic.agent.server.api", "SimpleElasticAgent", "self._no_such_counter", "")
    monkeypatch.setattr(launcher, "TORCH_PRIVATE", launcher.TORCH_PRIVATE + (bogus,))
    assert launcher.missing_torch_names() == ["torch.distributed.elastic.agent.server.api.SimpleElasticAgent."
                                              "self._no_such_counter"]


@linux
def test_a_stopped_process_is_seen_and_orphans_are_reaped_with_their_children():
    """In a process of its own (as the agent is): a child stopped by SIGSTOP reads as stopped; reap()
    kills the children that are not the agent's own, with the grandchild one of them started, and
    collects them (no zombie child left)."""
    import json
    import textwrap

    script = textwrap.dedent("""
        import json, os, signal, subprocess, sys, time
        import psutil
        from rexmoe_train.resilience import launcher

        own = {p.pid for p in psutil.Process().children()}
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        os.kill(sleeper.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 20
        while not launcher._is_stopped(sleeper.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped = launcher._is_stopped(sleeper.pid)
        r, w = os.pipe()
        parent = subprocess.Popen([sys.executable, "-c", (
            "import os, subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"os.write({w}, str(p.pid).encode()); time.sleep(60)")], pass_fds=(w,))
        grandchild = int(os.read(r, 32))
        launcher.reap(own)

        def gone():
            try:
                return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 20  # SIGKILL takes effect when the kernel next runs it
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.02)
        print(json.dumps({"stopped": stopped, "collected": [sleeper.poll() is not None, parent.poll() is not None],
                          "grandchild_gone": gone(),
                          "children_left": [p.pid for p in psutil.Process().children()]}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"stopped": True, "collected": [True, True], "grandchild_gone": True,
                                       "children_left": []}


# ------------------------------------------------------------------------------------------------
# end to end: 2 workers under the real launcher
# ------------------------------------------------------------------------------------------------
def _launch(tmp_path, *overrides, restarts=2):
    from tests.resilience.test_scenarios import REPO, TINY, _clean_env

    cmd = [sys.executable, "-m", "rexmoe_train.cli.launch", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "rexmoe_train.cli.train", *TINY, "train.global_batch_size=2",
           f"run.dir={tmp_path / 'run'}", *overrides]
    out, err = open(tmp_path / "out", "w"), open(tmp_path / "err", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=out, stderr=err, start_new_session=True)


@pytest.mark.slow
@linux
def test_a_locked_run_dir_is_not_restarted_and_the_summary_is_the_error_line(tmp_path):
    from rexmoe_train.training.run_lock import RunLock

    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()  # another run holds the run dir
    try:
        code = finish_session(_launch(tmp_path, "train.train_iters=2", restarts=3))
    finally:
        lock.release()
    err = (tmp_path / "err").read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == ExitCode.USAGE, err
    assert len(lines) == 1, err
    assert lines[0].startswith("rexmoe-train: config error: run.dir=") and f"is in use by pid {os.getpid()}" in lines[0]
    assert lines[0].endswith("exit 2); not restarted: a restart would fail the same way"), lines[0]
    assert "rerun to resume" not in lines[0]
    assert "restart 1/3" not in err


@pytest.mark.slow
@linux
def test_sighup_to_the_launchers_group_saves_and_exits_129(tmp_path):
    import json

    run_dir = tmp_path / "run"
    proc = _launch(tmp_path, "train.train_iters=200", "train.log_interval=1")
    metrics = run_dir / "metrics.jsonl"

    def steps():
        try:
            return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        except (OSError, ValueError):
            return []

    deadline = time.monotonic() + 240
    while max(steps(), default=0) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "err").read_text()
    os.killpg(proc.pid, signal.SIGHUP)  # a closed terminal: the agent and every worker get it
    code = finish_session(proc, timeout=180)
    err, out = (tmp_path / "err").read_text(), (tmp_path / "out").read_text()
    assert code == ExitCode.HANGUP == 129, err
    saved = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 200
    assert f"[checkpoint] stopping at step {saved} (signal); exit 129" in out
    assert [line for line in err.splitlines() if line.strip()] == [
        f"rexmoe-train: stopped by SIGHUP; rerun to resume from iter_{saved:07d}"], err
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
