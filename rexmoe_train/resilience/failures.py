"""How a trainer process ends when something unexpected happens: one line, not a wall of tracebacks.

- The full traceback goes to ``<run.dir>/logs/<launch>/attempt<k>/rank<r>.err``, with a small
  ``rank<r>.fate.json`` (what happened, the step) that the launcher (cli/launch.py) turns into its
  summary line.
- A rank that failed because a *peer* went away (a collective raised: connection reset, timed out)
  is not the cause: it exits ``ExitCode.PEER_FAILED`` and prints nothing.
- Any other exception prints one line naming the rank (unless rexmoe's launcher prints the summary)
  and exits 1, which the launcher restarts.
- Under torchrun a worker asks the kernel to SIGKILL it when the agent dies (PR_SET_PDEATHSIG), so a
  killed agent leaves no trainer behind; the agent reaps what a dead worker leaves (cli/launch.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import attempt_dir

__all__ = ["is_peer_failure", "record_crash"]

# what torch's gloo / NCCL / store layers say when the other end of a collective is gone
_PEER_GONE = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout",
              "socket", "gloo", "nccl", "recvbytes", "sendbytes", "read error", "peer")


def is_peer_failure(err: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if isinstance(err, dist.DistError):
            return True
    except ImportError:
        pass
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(marker in text for marker in _PEER_GONE)


def record_crash(err: BaseException, run_dir: Optional[str], rank: int, step: Optional[int]) -> int:
    """Write the traceback and fate files, print at most one line; returns the exit code."""
    peer = is_peer_failure(err)
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    what = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    where = None
    if run_dir:
        logs = attempt_dir(run_dir, "logs")
        try:
            logs.mkdir(parents=True, exist_ok=True)
            where = logs / f"rank{rank}.err"
            with open(where, "a") as f:
                f.write(f"--- rank {rank}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                        f"step {step}\n")
                traceback.print_exception(type(err), err, err.__traceback__, file=f)
            fate = {"rank": rank, "step": step, "peer_failure": peer, "what": what, "traceback": str(where)}
            (logs / f"rank{rank}.fate.json").write_text(json.dumps(fate))
        except OSError:
            where = None
    if where is None:  # nowhere to keep it: the traceback is the evidence, print it
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if not peer and not os.environ.get("REXMOE_LAUNCHER"):
        print(f"rexmoe-train: rank {rank} failed at step {step}: {what}"
              + (f" (traceback: {where})" if where else ""), file=sys.stderr, flush=True)
    return ExitCode.PEER_FAILED if peer else ExitCode.FAILED
