"""The launcher's agent logic (cli/launch.py is the entry point): torch's LocalElasticAgent plus
- ONE summary line per failed attempt, naming the rank that caused it, what happened and where the
  restart (or a rerun) resumes, e.g. ``rexmoe-train: rank 1 died (SIGKILL) at step 15; restart 1/3
  resumes from iter_0000010``; for an error a restart cannot fix (exit 2: config, data, a lock held
  by another run) the line is the worker's own error line, which says what to change;
- no restart for the codes in ``exit_codes.NO_RESTART`` (2, 3, 75, 129, 130), and exit with that code;
- the reaper: the agent is a child subreaper, so what a dead worker leaves (megatron's checkpoint
  writers, data workers) is re-parented to it and killed when the worker group stops (psutil);
- a stopped (SIGSTOP) worker is SIGKILLed at once instead of waiting 30 s for a SIGTERM it cannot take.

Why hand-kept fate files and not torch's ``@record``: ``record`` writes torch's per-rank error file only
when the exception leaves the decorated main, and then Python prints the traceback to the terminal;
our workers catch everything, print one line (or nothing) and leave by ``os._exit`` (interpreter
teardown blocks on dead peers' process groups). torch's error file also lives in torchrun's temporary
log dir, gone with the agent, and keeps whole-second timestamps, which cannot order the failures of
one step. So ``<run.dir>/logs/.../rank<r>.fate.json`` (resilience/failures.py: the step, the traceback
kept in the run dir) stays what the summary reads for a crash; torch's error file format
(``TORCHELASTIC_ERROR_FILE``, read by the agent into ``ProcessFailure``) is the channel for an error
line (``write_error_file``), which works before the run dir is known (a config that does not compose).

torch-free at import; torch's private names this module relies on are listed in ``TORCH_PRIVATE``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from rexmoe_train.exit_codes import NO_RESTART, ExitCode
from rexmoe_train.resilience.attempts import attempt_dir, hang_report, hung_after_collective_abort, read_heartbeats

PREFIX = "rexmoe-train:"
FAILURE_GRACE_S = 10  # after a failure: how long the rest of the group gets to exit before SIGKILL
STOPPED_WHY = {ExitCode.USAGE: "bad config, data, lock or checkpoint",
               ExitCode.HALTED: "halted on non-finite steps",
               ExitCode.PREEMPTED: "pre-empted, checkpoint saved",
               ExitCode.HANGUP: "hung up (SIGHUP), checkpoint saved",
               ExitCode.INTERRUPTED: "interrupted (Ctrl-C)"}
ERROR_LINE_KEY = "rexmoe_error_line"  # marks an error file written by write_error_file

# torch internals the agent subclass relies on: (module, class or None, attribute, how it is used).
# An instance attribute (set in __init__) is checked in the class's __init__ source. Checked on torch
# TORCH_CHECKED_ON; tests/resilience/test_launcher.py asserts every one still exists.
TORCH_CHECKED_ON = ("2.13.0",)
TORCH_PRIVATE = (
    ("torch.distributed.launcher.api", None, "LocalElasticAgent",
     "launch_agent builds its agent through this module name; we replace it with our subclass"),
    ("torch.distributed.elastic.agent.server.local_elastic_agent", "LocalElasticAgent", "_monitor_workers",
     "overridden: snapshot the ranks that failed by themselves before torch stops the rest"),
    ("torch.distributed.elastic.agent.server.local_elastic_agent", "LocalElasticAgent", "_shutdown",
     "overridden: (death_sig, timeout); SIGKILL stopped workers, shorter grace, reap, summarise"),
    ("torch.distributed.elastic.agent.server.local_elastic_agent", "LocalElasticAgent", "self._pcontext",
     "the worker processes: .pids(), .subprocess_handlers"),
    ("torch.distributed.elastic.agent.server.api", "SimpleElasticAgent", "self._remaining_restarts",
     "set to 0 for a code a restart cannot fix; read for the restart count"),
    ("torch.distributed.elastic.multiprocessing.api", "SubprocessContext", "self.subprocess_handlers",
     "{local rank: handler}: poll a worker's exit code"),
    ("torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler", "SubprocessHandler",
     "self.proc", "the worker's Popen"),
)


def missing_torch_names() -> list[str]:
    """The entries of TORCH_PRIVATE that this torch lacks ([] when the agent can work as written)."""
    import importlib
    import inspect

    missing = []
    for module_name, cls_name, attr, _why in TORCH_PRIVATE:
        where = f"{module_name}.{cls_name + '.' if cls_name else ''}{attr}"
        try:
            owner = importlib.import_module(module_name)
            if cls_name:
                owner = getattr(owner, cls_name)
            if attr.startswith("self."):
                if f"{attr} " not in inspect.getsource(owner.__init__) and f"{attr}:" not in inspect.getsource(
                        owner.__init__):
                    missing.append(where)
            elif not hasattr(owner, attr):
                missing.append(where)
        except (ImportError, AttributeError, OSError, TypeError):
            missing.append(where)
    return missing


# ------------------------------------------------------------------------------------------------
# the worker side: an error line for the agent
# ------------------------------------------------------------------------------------------------
def write_error_file(line: str) -> bool:
    """Under torchrun, put this worker's one error line where the agent reads it (torch's per-rank
    error file, ``TORCHELASTIC_ERROR_FILE``, in the format torch's ErrorHandler writes). False when
    not under torchrun or it could not be written (then the caller prints the line itself)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {"message": {"message": line, "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time())),
                                                       ERROR_LINE_KEY: True}}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
        return True
    except OSError:
        return False


def worker_error_line(failure) -> Optional[str]:
    """The line a worker left with write_error_file, from torch's ProcessFailure; None otherwise."""
    message = (getattr(failure, "error_file_data", None) or {}).get("message")
    if isinstance(message, dict) and message.get("extraInfo", {}).get(ERROR_LINE_KEY):
        return str(message.get("message", "")).strip() or None
    return None


# ------------------------------------------------------------------------------------------------
# the agent side
# ------------------------------------------------------------------------------------------------
class RunPaths:
    """Where the run being launched keeps its checkpoints and logs (from its Hydra overrides)."""

    def __init__(self, overrides: list[str]) -> None:
        self.run_dir: Optional[str] = None
        self.save: Optional[Path] = None
        try:
            from rexmoe_train.checkpoint import layout
            from rexmoe_train.config.compose import compose_experiment

            experiment = compose_experiment(overrides).experiment
            self.run_dir = experiment.run.dir
            self.save = layout.save_root(experiment)
        except Exception:  # noqa: BLE001 -- the workers report a bad config themselves, in one line
            pass

    def resume_point(self) -> str:
        """The checkpoint a restart or rerun resumes from (the pointer names the newest complete one)."""
        if self.save is None:
            return "the last checkpoint"
        try:
            step = int((self.save / "latest_checkpointed_iteration.txt").read_text().strip())
            return f"iter_{step:07d}"
        except (OSError, ValueError):
            return "the start (no checkpoint yet)"


def _signal_name(failure) -> str:
    try:
        return failure.signal_name()
    except Exception:  # noqa: BLE001
        return f"signal {-failure.exitcode}"


def describe_failure(failures: dict, paths: RunPaths, launch: str, tries: int) -> tuple[int, str]:
    """(exit code, "rank R <what> at step S") for the failure that caused the others; for an error a
    restart cannot fix that left its line (write_error_file), the line itself."""
    logs = attempt_dir(paths.run_dir, "logs", launch, tries) if paths.run_dir else None
    beats = read_heartbeats(logs) if logs else {}
    fates = {}
    for rank in failures:
        try:
            fates[rank] = json.loads((logs / f"rank{rank}.fate.json").read_text())
        except (OSError, ValueError, TypeError):
            pass
    lines = {rank: line for rank, f in failures.items() if (line := worker_error_line(f))}
    hung = hung_after_collective_abort(beats, {r: f.exitcode for r, f in failures.items()})
    if hung:  # NCCL's timeout fired first: every waiting rank aborted; blame the rank they waited for
        return ExitCode.HUNG, hung

    def priority(item):
        """The cause first: killed by a signal (not the agent's SIGTERM / a Ctrl-C / a hang-up), then
        an error line, an exception or another exit code on the rank itself, then a watchdog exit,
        then a lost peer."""
        rank, failure = item
        code = failure.exitcode
        if code < 0:
            stop = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            return (5 if -code in stop else 0, rank)
        if code == ExitCode.PEER_FAILED:
            return (4, rank)
        if code == ExitCode.HUNG:
            return (3, rank)
        if rank in lines:
            return (1, rank)
        return (1.5 if rank in fates or code in NO_RESTART else 2, rank)

    rank, failure = min(failures.items(), key=priority)
    code = failure.exitcode
    step = beats.get(rank, {}).get("step")
    if code < 0:
        what = f"died ({_signal_name(failure)})"
    elif code == ExitCode.HUNG:
        report = hang_report(paths.run_dir, launch, tries) if paths.run_dir else None
        if report and report["culprits"]:
            rank = report["culprits"][0]
            step = beats.get(rank, {}).get("step", report["step"])
            others = report["culprits"][1:]
            what = "hung" + (f" (and rank {', '.join(map(str, others))})" if others else "")
            what += f"; the other ranks' stacks are in {report['dir']}"
        else:
            what = "stopped at the watchdog" + (f"; stacks in {report['dir']}" if report else "")
    elif rank in lines:
        return code, f"{lines[rank]} (rank {rank}, exit {code})"
    elif code in NO_RESTART:
        what = f"exited {code} ({STOPPED_WHY[ExitCode(code)]})"
    elif rank in fates:
        what = f"failed ({fates[rank]['what']}; traceback: {fates[rank]['traceback']})"
        step = fates[rank].get("step", step)
    else:
        what = f"exited {code}"
    at = f" at step {step}" if step is not None else ""
    return code, f"rank {rank} {what}{at}"


def summary_tail(code: int, remaining: int, max_restarts: int, resume: str) -> str:
    """What happens next: a restart, or what the user does (a rerun resumes; a fix comes first)."""
    if remaining > 0:
        return f"restart {max_restarts - remaining + 1}/{max_restarts} resumes from {resume}"
    if code == ExitCode.USAGE:
        return "not restarted: a restart would fail the same way"
    if code in NO_RESTART:
        return f"not restarted; rerun to resume from {resume}"
    if max_restarts:
        return f"no restart left ({max_restarts} used); rerun to resume from {resume}"
    return f"restarts are off; rerun to resume from {resume}"


def say(line: str) -> None:
    """Print one line on stderr; a terminal that has hung up (SIGHUP) is left for /dev/null first."""
    from rexmoe_train.resilience.signals import leave_hung_terminal

    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        leave_hung_terminal(None)


def _is_stopped(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def reap(own: set[int], rounds: int = 20) -> None:
    """Kill what the workers left behind (re-parented to this subreaper: children of this process
    that are not in ``own``), with their descendants, then collect them."""
    import psutil

    me = psutil.Process()
    for _ in range(rounds):
        orphans = [p for p in me.children() if p.pid not in own]
        if not orphans:
            return
        if os.environ.get("REXMOE_LAUNCH_DEBUG"):
            print(f"[launch] reaping {sorted(p.pid for p in orphans)}", file=sys.stderr, flush=True)
        doomed = list(orphans)
        for orphan in orphans:
            try:
                doomed += orphan.children(recursive=True)
            except psutil.Error:
                pass
        for proc in doomed:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(orphans, timeout=1)  # our children: waited for, so no zombie is left


def make_agent_class(paths: RunPaths, launch: str):
    import psutil
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class ResilientAgent(LocalElasticAgent):
        """torch's LocalElasticAgent plus the summary line, the no-restart codes and the reaper."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._own_children = {p.pid for p in psutil.Process().children()}  # the agent's helpers
            self._pending: Optional[tuple] = None
            self._tries = 0
            self.last_summary: Optional[str] = None
            self.exit_code = 0

        def _first_failures(self, worker_group) -> dict[int, int]:
            """{global rank: exit code} of the workers that have failed by themselves, looked at before
            torch's monitor stops the rest (it adds the ranks it SIGTERMs / SIGKILLs to its failures).
            When one has failed, a stopped worker is SIGKILLed now: it cannot take torch's SIGTERM,
            which would cost the full 30 s shutdown wait."""
            handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
            failed = {}
            for local_rank, handler in handlers.items():
                code = handler.proc.poll()
                if code:
                    failed[worker_group.workers[local_rank].global_rank] = code
            if failed:
                for handler in handlers.values():
                    if handler.proc.poll() is None and _is_stopped(handler.proc.pid):
                        handler.proc.kill()
            return failed

        def _monitor_workers(self, worker_group):
            first = self._first_failures(worker_group) if self._pending is None else {}
            result = super()._monitor_workers(worker_group)
            if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and self._pending is None:
                codes = {f.exitcode for f in result.failures.values()}
                self._tries = worker_group.spec.max_restarts - self._remaining_restarts
                if codes & NO_RESTART:
                    self._remaining_restarts = 0  # restarting cannot help, or the run asked to stop
                # the ranks torch SIGTERMed / SIGKILLed while stopping the group are not causes, unless
                # they had died by themselves before (then they are in the snapshot)
                killed = (-signal.SIGTERM, -signal.SIGKILL)
                causes = {r: f for r, f in result.failures.items()
                          if r in first or f.exitcode not in killed} or dict(result.failures)
                self._pending = (causes, self._remaining_restarts, worker_group.spec.max_restarts)
            return result

        def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
            pids = list(self._pcontext.pids().values()) if self._pcontext else []
            for pid in pids:  # a stopped worker cannot take SIGTERM: do not wait 30 s for it
                if _is_stopped(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if self._pending is not None:
                timeout = min(timeout, FAILURE_GRACE_S)  # the group failed: nothing left to save
            super()._shutdown(death_sig, timeout)
            reap(self._own_children)
            if self._pending is not None:
                self._summarise(*self._pending)
                self._pending = None

        def _summarise(self, failures: dict, remaining: int, max_restarts: int) -> None:
            code, what = describe_failure(failures, paths, launch, self._tries)
            self.last_summary = f"{PREFIX} {what}; {summary_tail(code, remaining, max_restarts, paths.resume_point())}"
            self.exit_code = code if code in NO_RESTART else ExitCode.FAILED
            say(self.last_summary)

    return ResilientAgent
