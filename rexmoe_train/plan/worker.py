"""Runs simulations in a fresh process: megatron keeps global state, and a process that simulates
several layouts would otherwise carry one layout's groups and trackers into the next.

``python -m rexmoe_train.plan.worker IN OUT``: IN holds a pickled ``(cfg, world_size, jobs)`` with
jobs a list of ``(rank, SimSettings)``; OUT receives the pickled list of RankTraces (or the error).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from rexmoe_train.plan.records import RankTrace


class SimulationError(RuntimeError):
    """A simulated step failed: the config cannot be built or run at this layout."""


def run_jobs(cfg, world_size: int, jobs: Sequence[tuple], timeout_s: float = 3600) -> list[RankTrace]:
    """Simulate ``jobs`` in one fresh Python process; RankTraces in job order."""
    with tempfile.TemporaryDirectory(prefix="rexmoe-plan-") as tmp:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(src, "wb") as f:
            pickle.dump((cfg, world_size, list(jobs)), f)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # fake tensors compute nothing: one thread is enough
        proc = subprocess.run([sys.executable, "-m", "rexmoe_train.plan.worker", src, dst], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        if not os.path.exists(dst):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SimulationError(f"simulation failed (exit {proc.returncode}): {tail[0]}")
        with open(dst, "rb") as f:
            ok, payload = pickle.load(f)
    if not ok:
        raise SimulationError(payload)
    return payload


def main(argv: Sequence[str]) -> int:
    src, dst = argv
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.plan.simulate import simulate_rank

    with open(src, "rb") as f:
        cfg, world_size, jobs = pickle.load(f)
    try:
        result = (True, [simulate_rank(cfg, world_size, rank, settings) for rank, settings in jobs])
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line
        result = (False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    with open(dst, "wb") as f:
        pickle.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
