"""Per-rank progress watchdog: a step, evaluation or save that overruns its budget leaves evidence and
ends the process, so the launcher can restart the run instead of waiting on a dead collective.

Each rank writes a small heartbeat (the section it entered, its step, the time) when a section starts,
and a thread waits on the section's monotonic deadline. On overrun every live rank writes, under
``<run.dir>/hang/<launch>/attempt<k>/``:

- ``rank<r>.txt``: which section overran, then every thread's Python stack (``faulthandler``);
- ``rank<r>.flight_recorder.json``: torch's flight recorder (the last collectives of every process
  group with their sequence ids and states, completed ones included: the last completed sequence id
  of each group is what shows which rank stopped issuing; ``TORCH_FR_BUFFER_SIZE`` must be set before
  the groups are made, which ``parallel/state.py`` does). NCCL groups record into ProcessGroupNCCL's
  own recorder, read by ``_dump_nccl_trace_json``; gloo's into the generic one
  (``_dump_fr_trace_json``): the dump reads the one of the default group's backend,

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
    """``with watchdog.section("step", 15): ...``; a daemon thread enforces the budget. Until
    ``end_start_up()`` the first section of each name gets at least ``first_budget`` (warm-up)."""

    def __init__(self, run_dir: str, rank: int, world_size: int, budgets: dict[str, Optional[float]],
                 first_budget: float) -> None:
        self.rank, self.world_size = rank, world_size
        self.budgets = budgets
        self.first_budget = first_budget  # the first of each section in start-up (warm-up, compile)
        self._seen: set[str] = set()
        self._starting = True
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
            if self._starting and budget is not None:
                budget = max(budget, self.first_budget)
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

    def end_start_up(self) -> None:
        """Start-up is over (the collective timeout drops to the training one): budgets as configured."""
        self._starting = False

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


def _backend() -> str:
    try:
        import torch.distributed as dist

        return str(dist.get_backend()) if dist.is_initialized() else "none"
    except Exception:  # noqa: BLE001 -- evidence only
        return "unknown"


def flight_recorder_dump(backend: str):
    """(name, function) of torch's flight-recorder JSON dump for ``backend``: NCCL collectives are
    recorded by ProcessGroupNCCL (its own recorder, in CUDA builds only), the rest by the generic one.
    Both take (includeCollectives, onlyActive)."""
    import torch._C._distributed_c10d as c10d

    name = "_dump_nccl_trace_json" if "nccl" in backend.lower() else "_dump_fr_trace_json"
    return name, getattr(c10d, name)


def _dump_flight_recorder(path: Path, backend: Optional[str] = None) -> str:
    """torch's flight recorder as JSON; returns what happened, in words (it is optional evidence)."""
    if not int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0):
        return "off (TORCH_FR_BUFFER_SIZE is 0)"
    try:
        name, dump = flight_recorder_dump(backend or _backend())
        # collectives included, completed entries kept (onlyActive=False); the JSON form has no C++ stacks
        data = dump(True, False)
        path.write_bytes(data if isinstance(data, bytes) else str(data).encode())
        return f"{path} ({name})"
    except Exception as err:  # an older torch or a backend without it: the stacks still stand
        return f"not written ({type(err).__name__}: {err})"
