"""Per-rank progress watchdog: a step, evaluation or save that overruns its budget leaves evidence and
ends the process, so the launcher can restart the run instead of waiting on a dead collective.

Each rank writes a small heartbeat (the section it entered, its step, the time) when a section starts,
and a thread waits on the section's monotonic deadline. On overrun every live rank writes, under
``<run.dir>/hang/<launch>/attempt<k>/``:

- ``rank<r>.txt``: which section overran, then every thread's Python stack (``faulthandler``);
- ``rank<r>.flight_recorder.json``: torch's flight recorder (the last collectives of every process
  group with their sequence ids and states; works for gloo when ``TORCH_FR_BUFFER_SIZE`` is set
  before the groups are made, which ``parallel/state.py`` does),

then exits ``ExitCode.HUNG``. A rank that cannot run at all (SIGSTOP, a wedged driver) writes nothing:
``hang_report`` names it as the rank that did not arrive, from the heartbeats and the missing dumps.

WHY heartbeat files in run.dir, not torchrun's TCPStore: the run dir is shared by every node already
(checkpoints live there), the files outlive the processes and the agent's store (the launcher reads
them after the group is gone to write its summary), and one small write per section is ~0.1 ms.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import attempt_dir

__all__ = ["Watchdog"]
HANG_GRACE_S = 5.0  # after its dump, a rank waits this long for the other ranks' dumps before exiting


class Watchdog:
    """``with watchdog.section("step", 15): ...``; a daemon thread enforces the budget."""

    def __init__(self, run_dir: str, rank: int, world_size: int, budgets: dict[str, Optional[float]],
                 first_budget: float) -> None:
        self.rank, self.world_size = rank, world_size
        self.budgets = budgets
        self.first_budget = first_budget  # the first of each section in this process (warm-up, compile)
        self._seen: set[str] = set()
        self.logs = attempt_dir(run_dir, "logs")
        self.hang = attempt_dir(run_dir, "hang")
        self.logs.mkdir(parents=True, exist_ok=True)
        self._heartbeat = self.logs / f"rank{rank}.heartbeat.json"
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._current: tuple = ("start", 0, 0.0, 0.0)  # section, step, budget, started (monotonic)
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.exit = os._exit  # a test seam: the in-process test records the code instead of exiting

    @contextmanager
    def section(self, name: str, step: int) -> Iterator[None]:
        budget = self.budgets.get(name)
        if name not in self._seen:
            self._seen.add(name)
            budget = None if budget is None else max(budget, self.first_budget)
        self._beat(name, step)
        if budget is None:
            yield
            return
        with self._cond:
            now = time.monotonic()
            self._current = (name, step, budget, now)
            self._deadline = now + budget
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="rexmoe-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()

    def _beat(self, name: str, step: int) -> None:
        beat = {"rank": self.rank, "world_size": self.world_size, "section": name, "step": step,
                "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
        try:
            self._heartbeat.write_text(json.dumps(beat))
        except OSError:  # evidence only: a full disk must not stop training
            pass

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._fire()
                return

    def _fire(self) -> None:
        name, step, budget, started = self._current
        waited = time.monotonic() - started
        self.hang.mkdir(parents=True, exist_ok=True)
        header = (f"rexmoe-train watchdog: rank {self.rank} (pid {os.getpid()}, host {socket.gethostname()}): "
                  f"{'step' if name == 'step' else name + ' at step'} {step} overran its budget of {budget:g} s "
                  f"({waited:.1f} s so far)\n")
        with open(self.hang / f"rank{self.rank}.txt", "w") as f:
            f.write(header + "\nPython stacks of every thread (faulthandler):\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
            f.write("\nflight recorder: " + _dump_flight_recorder(self.hang / f"rank{self.rank}.flight_recorder.json")
                    + "\n")
        print(header.rstrip() + f"; stacks in {self.hang}; exiting {ExitCode.HUNG}", flush=True)
        # WHY wait: the other live ranks wait in the same collective and their budgets end moments
        # later; exiting at once would break their collective first (they would exit 77 without stacks)
        time.sleep(min(HANG_GRACE_S, budget))
        self.exit(ExitCode.HUNG)


def _dump_flight_recorder(path: Path) -> str:
    """torch's flight recorder as JSON; returns what happened, in words (it is optional evidence)."""
    if not int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0):
        return "off (TORCH_FR_BUFFER_SIZE is 0)"
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        path.write_bytes(_dump_fr_trace_json(True, True))  # collectives, without C++ stack traces
        return str(path)
    except Exception as err:  # an older torch or a backend without it: the stacks still stand
        return f"not written ({type(err).__name__}: {err})"
