"""`rexmoe-train` with a fault injected: `python tests/training/_fault_cli.py POINT@STEP OVERRIDES...`
SIGKILLs the process at one named point of the save of STEP (rexmoe_train.checkpoint.faults'
SAVE_POINTS), through that test seam. Test-only: production code holds no kill logic."""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    spec, overrides = sys.argv[1], sys.argv[2:]
    point, _, at = spec.partition("@")
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.checkpoint import faults
    from rexmoe_train.cli.train import main as train_main

    if point not in faults.SAVE_POINTS:
        raise SystemExit(f"unknown save point {point!r}; one of {', '.join(faults.SAVE_POINTS)}")

    def kill_at(name: str, step: int) -> None:
        if name == point and (not at or int(at) == step):
            os.kill(os.getpid(), signal.SIGKILL)

    faults.set_fault_hook(kill_at)
    return train_main(overrides)


if __name__ == "__main__":
    sys.exit(main())
