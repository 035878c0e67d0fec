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
import re
import sys
import time
import traceback
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import attempt_dir

__all__ = ["is_peer_failure", "record_crash"]

# Classified by where the error comes from, not by words anywhere in it (a rank's own bug may say
# "timeout" or "nccl"): c10d's network and store errors (torch.distributed.DistNetworkError,
# DistStoreError: the store's host or a peer's socket went away); a c10d backend error
# (DistBackendError, how ProcessGroupNCCL raises) when NCCL says a peer is gone or a collective timed
# out, and not when it says this rank misused it ("invalid usage", "invalid argument", a CUDA error);
# gloo's transport errors, which torch 2.13 raises as a RuntimeError located in gloo's transport
# sources: "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1234. ...",
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete".
_NCCL_PEER_GONE = ("remote process exited", "ncclremoteerror", "watchdog caught collective operation timeout",
                   "communicator was aborted", "nccl operations have failed or timed out",
                   "connection closed by", "connection reset by")
_GLOO_TRANSPORT = re.compile(r"^\[[^\]\s]*gloo/transport/[^\]\s]*:\d+\] ")


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank (or the store) went away."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    network = tuple(getattr(dist, name) for name in ("DistNetworkError", "DistStoreError") if hasattr(dist, name))
    if network and isinstance(err, network):
        return True
    text = str(err).strip()
    if isinstance(err, getattr(dist, "DistBackendError", ())):
        return any(marker in text.lower() for marker in _NCCL_PEER_GONE) or bool(_GLOO_TRANSPORT.match(text))
    return isinstance(err, RuntimeError) and bool(_GLOO_TRANSPORT.match(text))


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
