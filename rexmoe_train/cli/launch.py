"""torchrun with rexmoe's failure handling: ``python -m rexmoe_train.cli.launch [torchrun options]
-m rexmoe_train.cli.train OVERRIDES...`` (launch/torchrun.sh and launch/slurm.sbatch call it).

It is torchrun (torch.distributed.run: the same options, elastic agent and c10d rendezvous), with an
agent subclass that
- prints ONE line per failed attempt, naming the rank that caused it, what happened and the
  checkpoint the restart (or a rerun) resumes from, e.g.
  ``rexmoe-train: rank 1 died (SIGKILL) at step 15; restart 1/3 resumes from iter_0000010``;
  the per-rank tracebacks stay in ``<run.dir>/logs/`` (resilience/failures.py) and torchrun's own
  logging is kept to errors (REXMOE_LAUNCH_VERBOSE=1 shows it);
- does not restart what a restart cannot fix or what asked to stop: exit 2 (bad config or
  checkpoint), 3 (halted on non-finite steps), 75 (pre-empted, checkpoint saved) and 130 (Ctrl-C),
  and exits with that code (plain torchrun reports every failure as 1);
- after a hang (a worker exited 76) writes ``<run.dir>/hang/.../report.txt`` naming the rank that did
  not arrive (resilience/watchdog.py), and SIGKILLs a stopped worker at once instead of waiting 30 s
  for a SIGTERM it cannot take;
- is a child subreaper (Linux): what a dead worker leaves (megatron's checkpoint-writer processes,
  data workers, multiprocessing's resource tracker) is re-parented to the agent, which kills it when
  the worker group stops, so no process of the run outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import (
    attempt_dir,
    become_subreaper,
    hang_report,
    read_heartbeats,
)

NO_RESTART = {ExitCode.USAGE: "bad config or checkpoint", ExitCode.HALTED: "halted on non-finite steps",
              ExitCode.PREEMPTED: "pre-empted, checkpoint saved", ExitCode.INTERRUPTED: "interrupted (Ctrl-C)"}
PREFIX = "rexmoe-train:"
FAILURE_GRACE_S = 10  # after a failure: how long the rest of the group gets to exit before SIGKILL


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
    """(exit code, "rank R <what> at step S") for the failure that caused the others."""
    logs = attempt_dir(paths.run_dir, "logs", launch, tries) if paths.run_dir else None
    beats = read_heartbeats(logs) if logs else {}
    fates = {}
    for rank in failures:
        try:
            fates[rank] = json.loads((logs / f"rank{rank}.fate.json").read_text())
        except (OSError, ValueError, TypeError):
            pass

    def priority(item):
        """The cause first: killed by a signal (not the agent's SIGTERM / a Ctrl-C), then an exception
        or another exit code on the rank itself, then a watchdog exit, then a lost peer."""
        rank, failure = item
        code = failure.exitcode
        if code < 0:
            rank_of_signal = 5 if -code in (signal.SIGTERM, signal.SIGINT) else 0
            return (rank_of_signal, rank)
        if code == ExitCode.PEER_FAILED:
            return (4, rank)
        if code == ExitCode.HUNG:
            return (3, rank)
        return (1 if rank in fates or code in NO_RESTART else 2, rank)

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
    elif code in NO_RESTART:
        what = f"exited {code} ({NO_RESTART[code]})"
    elif rank in fates:
        what = f"failed ({fates[rank]['what']}; traceback: {fates[rank]['traceback']})"
        step = fates[rank].get("step", step)
    else:
        what = f"exited {code}"
    at = f" at step {step}" if step is not None else ""
    return code, f"rank {rank} {what}{at}"


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def make_agent_class(paths: RunPaths, launch: str):
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class ResilientAgent(LocalElasticAgent):
        """torch's LocalElasticAgent plus the summary line, the no-restart codes and the reaper."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._own_children = _children(os.getpid())  # the agent's own helpers: never reaped
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
                if codes & set(NO_RESTART):
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
            self._reap()
            if self._pending is not None:
                self._summarise(*self._pending)
                self._pending = None

        def _summarise(self, failures: dict, remaining: int, max_restarts: int) -> None:
            code, what = describe_failure(failures, paths, launch, self._tries)
            resume = paths.resume_point()
            if remaining > 0:
                tail = f"restart {max_restarts - remaining + 1}/{max_restarts} resumes from {resume}"
            elif code in NO_RESTART:
                tail = f"not restarted; rerun to resume from {resume}"
            else:
                tail = (f"no restart left ({max_restarts} used); rerun to resume from {resume}"
                        if max_restarts else f"restarts are off; rerun to resume from {resume}")
            self.last_summary = f"{PREFIX} {what}; {tail}"
            self.exit_code = code if code in NO_RESTART else ExitCode.FAILED
            print(self.last_summary, file=sys.stderr, flush=True)

        def _reap(self) -> None:
            """Kill what the workers left behind (re-parented to this subreaper), then collect it."""
            for _ in range(20):
                orphans = _children(os.getpid()) - self._own_children
                if not orphans:
                    return
                if os.environ.get("REXMOE_LAUNCH_DEBUG"):
                    print(f"[launch] reaping {sorted(orphans)}", file=sys.stderr, flush=True)
                for pid in orphans:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for pid in orphans:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                time.sleep(0.05)

    return ResilientAgent


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api as launcher_api

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    launch = os.environ.setdefault("REXMOE_LAUNCH_ID", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    os.environ["REXMOE_LAUNCHER"] = "1"  # workers leave the summary line to this process
    # WHY: with the c10d rendezvous, torchrun shares its rendezvous TCPStore with the workers, and after
    # a restart a worker can read the previous attempt's gloo addresses from it ("connectFullMesh
    # failed ... Connection refused"; pytorch/pytorch#135712). A store of its own per round avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    paths = RunPaths(list(args.training_script_args))
    if not os.environ.get("REXMOE_LAUNCH_VERBOSE"):  # torchrun's per-failure log lines: the summary says it
        for name in [*logging.Logger.manager.loggerDict, "torch.distributed.elastic"]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    become_subreaper()
    agents = []
    agent_class = make_agent_class(paths, launch)

    def make_agent(*a, **kw):
        agents.append(agent_class(*a, **kw))
        return agents[-1]

    launcher_api.LocalElasticAgent = make_agent  # launch_agent builds its agent through this name
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError:
        agent = agents[-1] if agents else None
        return agent.exit_code if agent is not None and agent.exit_code else ExitCode.FAILED
    except SignalException as err:
        sig = signal.Signals(err.sigval)
        # the workers have saved at their step boundary (or were stopped at once by a second Ctrl-C)
        print(f"{PREFIX} stopped by {sig.name}; rerun to resume from {paths.resume_point()}", file=sys.stderr,
              flush=True)
        return 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
