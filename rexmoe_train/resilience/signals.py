"""Stop signals in a process's first seconds, and a terminal that has hung up. Torch-free: the CLI
installs these before its imports load torch and megatron (seconds), and training/guard.py takes over
from them."""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional

from rexmoe_train.exit_codes import ExitCode

# Under torchrun a Ctrl-C reaches a worker twice: from the terminal (same process group) and forwarded
# by the agent a few milliseconds later. A SIGINT within this window of the first is that copy.
DUPLICATE_SIGINT_S = 1.0


def leave_hung_terminal(output: Optional[str]) -> None:
    """Point stdout / stderr (fds 1 and 2) at ``output`` (or /dev/null) when they are a terminal that
    has hung up: every write to it fails with EIO, which would turn the stop line, and the flush at
    exit, into an error. A zero-length write finds out without writing anything."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
            continue
        except OSError as err:
            if err.errno != errno.EIO:
                continue
        target = os.devnull
        if output:
            try:
                os.makedirs(os.path.dirname(output), exist_ok=True)
                target = output
            except OSError:
                pass
        try:
            new = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            new = os.open(os.devnull, os.O_WRONLY)
        os.dup2(new, fd)
        os.close(new)


class EarlySignals:
    """Stop signals from process start until training.guard takes over (importing torch and megatron
    takes seconds): recorded, then handed to the Trainer, which saves (if there is a step to save) and
    exits 75 / 129 / 130. A second Ctrl-C here stops at once: nothing is built yet."""

    def __init__(self, install: bool = False) -> None:
        self.received: list[int] = []
        self.hangup_output: Optional[str] = None
        self.first_sigint: Optional[float] = None
        self.installed = False
        self.signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
        if install:
            self.install()

    @staticmethod
    def is_cli(argv0: str) -> bool:
        """``rexmoe-train`` or ``python -m rexmoe_train.cli.train``."""
        return os.path.basename(argv0) == "rexmoe-train" or argv0.endswith(os.path.join("rexmoe_train", "cli",
                                                                                        "train.py"))

    def _record(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            leave_hung_terminal(self.hangup_output)
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint is None:
                self.first_sigint = now
            elif now - self.first_sigint > DUPLICATE_SIGINT_S:  # not torchrun's forwarded copy
                os._exit(ExitCode.INTERRUPTED)
        self.received.append(signum)

    def take(self) -> list[int]:
        """The signals recorded so far, handed over once (to training.guard); the record starts afresh
        (a later in-process run must not inherit them)."""
        received, self.received, self.first_sigint = self.received, [], None
        return received

    def install(self) -> None:
        if self.installed:
            return
        for sig in self.signals:
            if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:  # nohup: stay ignored
                signal.signal(sig, self._record)
        self.installed = True

    def uninstall(self) -> None:
        """checkpoint.exit_signal_handler=false: default dispositions, and a signal already received
        takes effect now."""
        for sig in self.signals:
            if signal.getsignal(sig) == self._record:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        self.installed = False
        for signum in self.received[:1]:
            os.kill(os.getpid(), signum)
