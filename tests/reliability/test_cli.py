"""The real CLI where only a process shows the behaviour: a signal during start-up, a second process on
a locked run dir, a disk that fills up during a save (a small tmpfs in a user namespace)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rexmoe_train.checkpoint import layout
from tests.training.test_checkpoint import TINY, cli, finish

REPO = Path(__file__).resolve().parents[2]


def _wait_for(path: Path, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, "the trainer ended before creating " + str(path)
        time.sleep(0.02)


@pytest.mark.slow  # a real end-to-end CLI run
def test_signal_during_startup_exits_75(tmp_path):
    """SIGTERM while the model is being built (the run dir is locked from the start of the build)."""
    run_dir = tmp_path / "run"
    proc = cli("train.train_iters=50", f"run.dir={run_dir}", log=tmp_path / "logs" / "run")
    _wait_for(run_dir / layout.LOCK, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 75 and "Traceback" not in err, err[-3000:]
    assert "stopping before training resumed at step 0" in out, out[-2000:]
    assert not (run_dir / "checkpoints").exists()  # nothing trained: nothing to save


@pytest.mark.slow  # a real end-to-end CLI run
def test_locked_run_dir_exits_2_naming_the_holder(tmp_path):
    from rexmoe_train.training.run_lock import RunLock

    run_dir = tmp_path / "run"
    holder = RunLock(str(run_dir))  # this process holds it, as a running trainer's rank 0 does
    holder.acquire()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    try:
        rc, out, err = finish(cli("train.train_iters=2", f"run.dir={run_dir}", log=tmp_path / "logs" / "second"))
    finally:
        holder.release()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert f"is in use by pid {os.getpid()} on host" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([layout.LOCK, "metrics.jsonl"])  # nothing touched
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=1m tmpfs \"$(mktemp -d)\""], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="needs unprivileged user namespaces (unshare -rm) for a small tmpfs")
@pytest.mark.slow  # a real end-to-end CLI run
def test_disk_full_during_save(tmp_path):
    """A: 2 steps, saved. B: resumes to 4 with ~1 MiB free; the step-4 save hits ENOSPC: one line naming
    the path and errno, iter_2 and the pointer intact. C: a dead save's .tmp fills the disk to the last
    byte; the next start removes it before anything else writes (metrics trimming used to fail first)."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    train = " ".join([shlex.quote(sys.executable), "-m", "rexmoe_train.cli.train", *TINY, f"run.dir={disk}/run"])
    ckpts = f"{disk}/run/checkpoints"
    script = f"""
    mount -t tmpfs -o size=40m tmpfs {disk} || exit 90
    {train} train.train_iters=2 >{out}/a.out 2>{out}/a.err; echo $? >{out}/a.rc
    dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null; truncate -s -1M {disk}/filler
    {train} train.train_iters=4 >{out}/b.out 2>{out}/b.err; echo $? >{out}/b.rc
    ls -a {ckpts} >{out}/b.ls; cp -a {ckpts}/iter_0000002 {out}/iter_0000002; cat {ckpts}/{layout.TRACKER} >{out}/b.ptr
    mkdir {ckpts}/iter_0000004.tmp; dd if=/dev/zero of={ckpts}/iter_0000004.tmp/__0_0.distcp bs=4k 2>/dev/null
    {train} train.train_iters=2 >{out}/c.out 2>{out}/c.err; echo $? >{out}/c.rc
    ls -a {ckpts} >{out}/c.ls
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, timeout=400, check=True)
    read = lambda name: (out / name).read_text()  # noqa: E731
    assert read("a.rc").strip() == "0", read("a.err")[-2000:]
    lines = [line for line in read("b.err").splitlines() if line.strip()]
    assert read("b.rc").strip() == "2" and len(lines) == 1, read("b.err")[-3000:]
    assert "saving step 4 failed" in lines[0] and "[ENOSPC] No space left on device" in lines[0], lines[0]
    assert "previous checkpoint (step 2)" in lines[0]
    assert read("b.ptr").strip() == "2" and "iter_0000004.tmp" not in read("b.ls")
    assert layout.read_metadata(out / "iter_0000002")["step"] == 2  # every digest still matches
    assert read("c.rc").strip() == "0", read("c.err")[-3000:]
    assert "iter_0000004.tmp" not in read("c.ls")
