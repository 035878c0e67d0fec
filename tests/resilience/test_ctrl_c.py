"""Ctrl-C under the launcher, as a terminal delivers it: SIGINT to the whole process group (the agent
and every worker; torchrun forwards it to the workers once more). The run saves at the step boundary,
exits 130 with one line, and a rerun resumes from the saved step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.resilience.test_scenarios import REPO, TINY, _clean_env, _session_processes

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _logged_steps(run_dir) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def test_ctrl_c_saves_at_the_step_boundary_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rexmoe_train.cli.launch", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "2", "-m", "rexmoe_train.cli.train", *TINY, "train.global_batch_size=2",
           "train.train_iters=200", "train.log_interval=1", f"run.dir={run_dir}"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while max(_logged_steps(run_dir), default=0) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, (tmp_path / "err").read_text()
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            interrupted = time.monotonic()
            code = proc.wait(timeout=120)
            took = time.monotonic() - interrupted
            leftovers = _session_processes(proc.pid)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert code == 130, stderr
    saved = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 200
    assert f"[checkpoint] stopping at step {saved} (signal); exit 130" in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"rexmoe-train: stopped by SIGINT; rerun to resume from iter_{saved:07d}"], stderr
    assert leftovers == []
    print(f"[resilience] Ctrl-C at step >= 3: saved step {saved}, exit 130 after {took:.1f} s")
