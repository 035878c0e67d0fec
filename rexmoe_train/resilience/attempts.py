"""A run's attempts on disk, and the process-lifetime helpers the launcher and the trainers share.
Torch-free, so the launcher (cli/launch.py) reads them without loading megatron.

``<run.dir>/logs/<launch>/attempt<k>/``: per rank a heartbeat (``rank<r>.heartbeat.json``: the section
it last entered, its step, the time; resilience/watchdog.py), and after a failure its traceback
(``rank<r>.err``) and fate (``rank<r>.fate.json``; resilience/failures.py).
``<run.dir>/hang/<launch>/attempt<k>/``: the watchdog's dumps and ``report.txt`` (``hang_report``).
``<launch>`` is one launcher invocation, ``k`` torchrun's restart count.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from rexmoe_train.exit_codes import ExitCode

SECTIONS = ("step", "eval", "save")


def launch_id() -> str:
    """One launcher invocation (rexmoe_train.cli.launch sets it; plain torchrun: its run id)."""
    return os.environ.get("REXMOE_LAUNCH_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"


def attempt() -> int:
    """Which try of the launcher this process belongs to (0 before any restart)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_dir(run_dir: str, kind: str, launch: Optional[str] = None, tries: Optional[int] = None) -> Path:
    """``<run.dir>/<kind>/<launch>/attempt<k>``: kind is ``hang`` (dumps) or ``logs`` (heartbeats,
    tracebacks)."""
    launch = launch_id() if launch is None else launch
    tries = attempt() if tries is None else tries
    return Path(run_dir) / kind / launch / f"attempt{tries}"


def read_heartbeats(logs: Path) -> dict[int, dict]:
    beats = {}
    for path in logs.glob("rank*.heartbeat.json"):
        try:
            beat = json.loads(path.read_text())
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError):  # torn by a kill mid-write: that rank is unknown
            continue
    return beats


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """SIGKILL this process when the process that started it dies (Linux; no-op elsewhere)."""
    parent = os.getppid()
    if _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) and os.getppid() != parent:
        os._exit(ExitCode.PEER_FAILED)  # the parent died before the request took effect


def become_subreaper() -> bool:
    """Orphans of this process's descendants are re-parented to it (so it can reap them)."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def ranks_behind(beats: dict[int, dict]) -> list[int]:
    """The ranks whose last heartbeat is behind the others' (an earlier step, or an earlier section of
    the same step); [] when every rank was at the same place."""
    order = {r: (b["step"], SECTIONS.index(b["section"]) if b["section"] in SECTIONS else -1)
             for r, b in beats.items()}
    lowest = min(order.values()) if order else None
    behind = [r for r, o in order.items() if o == lowest]
    return sorted(behind) if order and len(behind) < len(order) else []


# how a rank ends when a collective it waited in timed out: NCCL's watchdog aborts the process
# (SIGABRT), or, where the error reaches Python (blocking wait, gloo), resilience/failures.py exits 77
COLLECTIVE_ABORT = (-int(signal.SIGABRT), int(ExitCode.PEER_FAILED))
STOPPED_BY_AGENT = (-int(signal.SIGTERM),)  # a SIGKILL may be the cause (the OOM killer)


def hung_after_collective_abort(beats: dict[int, dict], exit_codes: dict[int, int]) -> Optional[str]:
    """When the collective timeout fired before any watchdog budget (no rank exited 76), every rank
    that waited aborts and none names a cause. The rank they waited for is the one behind in the
    heartbeats, else (all at the same place) the ranks that did not abort (still running, or only
    stopped by the agent) while the others did. ``exit_codes``: the failed ranks' codes (negative: a
    signal). Returns "rank R hung ... at step S", or None if a rank failed of its own accord or the
    failures were no collective abort."""
    codes = {int(r): int(c) for r, c in exit_codes.items()}
    aborted = sorted(r for r, c in codes.items() if c in COLLECTIVE_ABORT)
    if not aborted or any(c not in COLLECTIVE_ABORT + STOPPED_BY_AGENT for c in codes.values()):
        return None
    world = max([b.get("world_size", 0) for b in beats.values()] + [max(codes) + 1])
    suspects = ranks_behind(beats) or [r for r in range(world) if r not in aborted]
    if not suspects or len(suspects) == world:
        return (f"every rank aborted in a collective that timed out (ranks {', '.join(map(str, aborted))}); "
                "the heartbeats do not tell which rank they waited for")
    step = beats.get(suspects[0], {}).get("step")
    at = f" at step {step}" if step is not None else ""
    others = f" (and rank {', '.join(map(str, suspects[1:]))})" if suspects[1:] else ""
    return (f"rank {suspects[0]} hung{at}{others}; the other ranks aborted in a collective that timed "
            "out before the watchdog's budget")


def hang_report(run_dir: str, launch: str, tries: int) -> Optional[dict]:
    """After a hang: which ranks dumped (were alive) and which did not arrive. None without dumps.

    The rank that did not arrive is a rank with a heartbeat but no dump (it could not run its
    watchdog: stopped, wedged in the kernel). If every rank dumped, the ranks whose heartbeat is
    behind the others' (an earlier step, or an earlier section of the same step) are named."""
    hang = attempt_dir(run_dir, "hang", launch, tries)
    dumped = sorted(int(p.stem[4:]) for p in hang.glob("rank*.txt") if p.stem[4:].isdigit())
    if not dumped:
        return None
    beats = read_heartbeats(attempt_dir(run_dir, "logs", launch, tries))
    world = max([b.get("world_size", 0) for b in beats.values()] + [max(dumped) + 1])
    silent = [r for r in range(world) if r not in dumped]
    culprits = silent if silent else ranks_behind(beats)
    first = culprits[0] if culprits else dumped[0]
    beat = beats.get(first, {})
    report = {"dir": str(hang), "dumped": dumped, "culprits": culprits,
              "section": beat.get("section"), "step": beat.get("step")}
    lines = [f"hang report ({hang}):",
             f"  ranks that dumped their stacks: {', '.join(map(str, dumped))}",
             f"  did not arrive: {', '.join(map(str, culprits)) if culprits else 'none (every rank waited)'}"]
    for r in sorted(beats):
        b = beats[r]
        lines.append(f"  rank {r}: last entered {b['section']} of step {b['step']} at "
                     f"{time.strftime('%H:%M:%S', time.localtime(b['time']))} (pid {b.get('pid')}, "
                     f"{b.get('host')})")
    try:
        (hang / "report.txt").write_text("\n".join(lines) + "\n")
    except OSError:
        pass
    return report
