"""Pre-emption and the numerics guard: what ends or skips a step, decided alike on every rank.

- SIGTERM / SIGUSR1 (or the wall-clock budget ``checkpoint.exit_duration_mins``) set a flag; the
  trainer saves at the next step boundary and exits 75 (``ExitCode.PREEMPTED``: launch/slurm.sbatch
  requeues). Ctrl-C (SIGINT) is the same save-and-stop, exiting 130 (``ExitCode.INTERRUPTED``: nothing
  requeues or restarts it); a second Ctrl-C raises KeyboardInterrupt at once. SIGHUP (a closed
  terminal, a dropped ssh session) is the same save-and-stop, exiting 129 (``ExitCode.HANGUP``: a
  user-side stop, like Ctrl-C, so nothing restarts or requeues it); its handler first points stdout
  and stderr away from a terminal that is gone (writes to it fail with EIO), and a SIGHUP that is
  ignored when the process starts (``nohup``) stays ignored. The handlers are
  installed before anything slow, so a signal during start-up (model build, the step-0 evaluation)
  ends the run cleanly too.
- A step whose loss or gradients are not finite is skipped (weights and LR schedule untouched);
  more than ``checkpoint.max_skipped_steps`` of them halt the run (``ExitCode.HALTED``).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from rexmoe_train import platform
from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.signals import DUPLICATE_SIGINT_S, leave_hung_terminal


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps, weights not finite). One line."""


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGHUP / SIGINT set a flag; the trainer acts on it at the next step boundary.
    A second SIGINT (after DUPLICATE_SIGINT_S) raises KeyboardInterrupt: stop at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
    # the agreed level (MAX over ranks) decides the exit code: a user-side stop wins over a pre-emption
    LEVELS = {signal.SIGTERM: 1, signal.SIGUSR1: 1, signal.SIGHUP: 2, signal.SIGINT: 3}
    EXIT_CODES = {0: ExitCode.PREEMPTED, 1: ExitCode.PREEMPTED, 2: ExitCode.HANGUP, 3: ExitCode.INTERRUPTED}

    def __init__(self, enabled: bool, exit_duration_mins: Optional[float], start_time: float) -> None:
        self.enabled = enabled
        self.deadline = None if exit_duration_mins is None else start_time + 60.0 * exit_duration_mins
        self.received: Optional[int] = None
        self.interrupted_at: Optional[float] = None  # monotonic time of the first SIGINT
        self.agreed_level = 0  # set by step_flags / stop_requested: the MAX of _level() over ranks
        self.agreed_save_due = False  # set by step_flags: a time-based save is due at this boundary
        self.hangup_output: Optional[str] = None  # where stdout/stderr go once the terminal is gone
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.interrupted_at is None:
                self.interrupted_at = now
            elif now - self.interrupted_at > DUPLICATE_SIGINT_S:
                raise KeyboardInterrupt
        if signum == signal.SIGHUP:
            leave_hung_terminal(self.hangup_output)
        if self.received is None or self.LEVELS[signum] >= self.LEVELS[self.received]:
            self.received = signum

    def record(self, signums: list) -> None:
        """Signals recorded before install() (the CLI's early bridge), in arrival order."""
        for signum in signums:
            if signum == signal.SIGINT and self.interrupted_at is None:
                self.interrupted_at = time.monotonic()
            if self.received is None or self.LEVELS[signum] >= self.LEVELS[self.received]:
                self.received = signum

    def exit_code(self) -> int:
        """75 for a pre-emption or the time budget, 129 after SIGHUP, 130 after Ctrl-C (on any rank)."""
        return self.EXIT_CODES[self.agreed_level]

    @property
    def agreed_interrupt(self) -> bool:
        return self.agreed_level >= self.LEVELS[signal.SIGINT]

    def _level(self) -> float:
        """0: no signal, 1: SIGTERM / SIGUSR1, 2: SIGHUP, 3: SIGINT (MAX over the ranks)."""
        return 0.0 if self.received is None else float(self.LEVELS[self.received])

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        if self._previous:
            return  # installed already (the CLI does it before the Trainer): keep the true previous
        for sig in self.SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: the user asked this run to outlive its terminal
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def local_flags(self) -> tuple[bool, bool]:
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        return self.received is not None, out_of_time


def local_step_is_bad(losses: list, chunks: list) -> bool:
    """This rank's view: a non-finite micro-batch loss (last stage) or a non-finite gradient in the
    DDP grad buffers (after the DP reduction)."""
    for d in losses or []:
        if "lm loss" in d and not bool(torch.isfinite(torch.as_tensor(d["lm loss"])).all()):
            return True
    for chunk in chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buf.grad_data).all()):
                return True
    return False


def step_flags(bad: bool, signals: StopSignals, save_due: bool = False) -> tuple[bool, bool, bool]:
    """All ranks agree (all_reduce MAX) on: skip this step, a signal arrived, out of time; and
    ``signals.agreed_save_due``: some rank (the trainer asks rank 0's clock only) says a
    time-based save is due (checkpoint.save_interval_minutes). One collective for all four."""
    _, out_of_time = signals.local_flags()
    t = torch.tensor([float(bad), signals._level(), float(out_of_time), float(save_due)], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    signals.agreed_level = int(t[1])
    signals.agreed_save_due = bool(t[3] > 0)
    return bool(t[0] > 0), bool(t[1] > 0), bool(t[2] > 0)


def stop_requested(signals: StopSignals) -> tuple[bool, bool]:
    """All ranks agree (all_reduce MAX) on: a signal arrived, out of time. Outside a step."""
    _, out_of_time = signals.local_flags()
    t = torch.tensor([signals._level(), float(out_of_time)], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    signals.agreed_level = int(t[0])
    return bool(t[0] > 0), bool(t[1] > 0)
