"""`rexmoe-train` killed during an async checkpoint write:
`python tests/resilience/_async_fault_cli.py STEP OVERRIDES...`.

The hook runs in the forked shard writer of the save of STEP (rexmoe_train.checkpoint.faults'
WRITER_POINTS: this rank's shard files are written, nothing is finalized) and SIGKILLs the trainer
(its parent); the writer itself then dies of the parent-death signal the manager sets. Test-only:
production code holds no kill logic."""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    at, overrides = int(sys.argv[1]), sys.argv[2:]
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.checkpoint import faults
    from rexmoe_train.cli.train import main as train_main

    trainer_pid = os.getpid()

    def kill_trainer(point: str, step: int) -> None:
        if point == "async_write" and step == at and os.getpid() != trainer_pid:
            os.kill(trainer_pid, signal.SIGKILL)
            time.sleep(30)  # the parent-death signal ends this writer; never reached otherwise

    faults.set_fault_hook(kill_trainer)
    return train_main(overrides)


if __name__ == "__main__":
    sys.exit(main())
