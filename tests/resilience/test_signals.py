"""resilience/signals.py and SIGHUP end to end: a closed terminal is a stop like Ctrl-C. The real CLI
sent SIGHUP mid-run saves at the step boundary (an async save in flight included), prints one line,
exits 129 (ExitCode.HANGUP) with no ``.tmp`` left, and the saved step resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.signals import EarlySignals

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ptys, SIGHUP")


def test_a_hung_up_terminal_is_left_for_the_hangup_file(tmp_path):
    """stdout on a pty whose other end closed (what a closed terminal is): writes fail with EIO until
    leave_hung_terminal points fd 1 at the file; then the line lands there and the exit is clean."""
    out = tmp_path / "logs" / "rank0.out"
    script = textwrap.dedent(f"""
        import os, sys
        from rexmoe_train.resilience.signals import leave_hung_terminal
        master, slave = os.openpty()
        os.dup2(slave, 1)
        os.close(master)  # the terminal goes away
        try:
            os.write(1, b"lost")
            sys.exit(3)
        except OSError:
            pass
        leave_hung_terminal({str(out)!r})
        print("stopping at step 7", flush=True)
        sys.stderr.write("stderr untouched\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "stopping at step 7\n"
    assert proc.stderr == "stderr untouched\n"  # a working stream (a pipe) is left alone


def test_early_signals_record_and_hand_over():
    early = EarlySignals()
    previous = {s: signal.getsignal(s) for s in early.signals}
    try:
        early.install()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        assert early.received == [signal.SIGHUP, signal.SIGTERM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    early._record(signal.SIGINT, None)
    early._record(signal.SIGINT, None)  # torchrun's forwarded copy of the same Ctrl-C: not a second one
    assert early.received[-2:] == [signal.SIGINT, signal.SIGINT]
    assert early.take()[:2] == [signal.SIGHUP, signal.SIGTERM] and early.received == []
    assert EarlySignals.is_cli("/usr/bin/rexmoe-train")
    assert EarlySignals.is_cli(os.path.join("x", "rexmoe_train", "cli", "train.py"))
    assert not EarlySignals.is_cli("/usr/bin/pytest")


def _steps(metrics) -> list[int]:
    import json

    try:
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_cli_sighup_saves_at_the_step_boundary_exits_129_and_resumes(megatron_world, tmp_path):
    from rexmoe_train import checkpoint
    from tests.helpers import make_trainer
    from tests.training.test_checkpoint import _cli_equivalent, cli

    run_dir = tmp_path / "run"
    proc = cli("train.train_iters=200", "train.log_interval=1", "checkpoint.save_interval=1",
               "checkpoint.async_save=true", "checkpoint.keep_last_n=2", f"run.dir={run_dir}",
               log=tmp_path / "logs" / "hup")
    try:
        deadline = time.monotonic() + 240
        while max(_steps(run_dir / "metrics.jsonl"), default=0) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "logs" / "hup.err").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)  # what a closed terminal sends
        rc = proc.wait(timeout=180)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = (tmp_path / "logs" / "hup.out").read_text()
    err = (tmp_path / "logs" / "hup.err").read_text()
    assert rc == ExitCode.HANGUP == 129, err[-3000:]
    assert err.strip() == "", err[-3000:]  # no traceback, no second line
    root = run_dir / "checkpoints"
    saved = checkpoint.read_tracker(root)
    assert 3 <= saved < 200
    stops = [line for line in out.splitlines() if "stopping" in line]
    assert stops == [f"[checkpoint] stopping at step {saved} (signal); exit 129: resume to continue"], out
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
    checkpoint.read_metadata(root / checkpoint.iter_name(saved))
    cfg = _cli_equivalent(run_dir, saved + 1)
    trainer = make_trainer(cfg)  # resumes from the step the SIGHUP saved
    assert trainer.step == saved
    trainer.run()
    assert trainer.step == saved + 1 and checkpoint.read_tracker(root) == saved + 1
