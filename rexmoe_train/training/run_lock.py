"""One run per run directory: rank 0 holds an exclusive lock on ``<run.dir>/rexmoe.lock`` for the
whole run. Two processes started on the same run dir would otherwise delete each other's ``.tmp``
saves and interleave ``metrics.jsonl``; the second one now stops with one line naming the holder.

A kernel lock, not a pid file: it goes when the holder dies, however it dies (SIGKILL included), so a
stale lock never blocks a restart. A POSIX record lock (``fcntl.lockf``) rather than ``flock``: flock
locks belong to the open file, which megatron's forked checkpoint-writer processes inherit, so a
killed trainer's leftover writers would keep the run dir locked; record locks belong to the process
and are not inherited across fork (they also work on NFS). The holder's pid and host are written
into the file only to be named in the error.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from rexmoe_train.checkpoint.layout import LOCK, why_not_a_dir
from rexmoe_train.core.errors import ConfigError


class RunLock:
    def __init__(self, run_dir: str) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK
        self._fd: Optional[int] = None
        self._created_dir = False

    def acquire(self) -> None:
        """Raises ConfigError (one line) when the dir is unusable or another process holds it."""
        problem = why_not_a_dir(self.dir)  # a symlink loop or dangling link: mkdir would say "File exists"
        if problem:
            raise ConfigError(f"config error: run.dir={str(self.dir)!r}: {problem}")
        if not self.dir.exists():
            try:
                self.dir.mkdir(parents=True)
            except OSError as err:
                raise ConfigError(f"config error: run.dir={str(self.dir)!r}: cannot create it: "
                                  f"{err.strerror} (errno {err.errno})") from None
            self._created_dir = True
        if os.path.lexists(self.path) and not self.path.is_file():  # a dir, a dangling link: no lock
            from rexmoe_train.training.run_logger import set_aside  # is held on it; keep it, use a new one

            try:
                set_aside(self.path, "is not a regular file")
            except OSError:
                pass  # the open below names the problem
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"config error: run.dir={str(self.dir)!r}: cannot open {LOCK}: "
                              f"{err.strerror} (errno {err.errno})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held by another process
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(f"config error: run.dir={str(self.dir)!r} is in use by {holder} "
                              f"(lock {self.path}); wait for it to finish or choose another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self, failed: bool = False) -> None:
        """Unlock. After a failed start, a run dir this lock created (and nothing else wrote into) is
        removed again: a refused start leaves nothing behind."""
        if self._fd is None:
            return
        if failed and self._created_dir:
            try:
                self.path.unlink()
                self.dir.rmdir()  # only when empty
            except OSError:
                pass
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
