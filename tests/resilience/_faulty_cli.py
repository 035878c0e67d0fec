"""`rexmoe-train` with faults injected into ranks, for tests/resilience (test-only: production code
holds no fault logic and reads no test variable). Run by the launcher as the training script:

    python -m rexmoe_train.cli.launch --nproc-per-node 4 tests/resilience/_faulty_cli.py OVERRIDES...

``REXMOE_TEST_FAULT`` is a comma-separated list of faults, each acting at the start of a step's first
forward pass (mid-step: the other ranks are inside the step's collectives):
  kill:R@S   rank R SIGKILLs itself at step S (first attempt only)
  stop:R@S   rank R SIGSTOPs itself at step S (first attempt only)
  raise:R@S  rank R raises RuntimeError at step S, at every attempt
  sleep:R=T  rank R sleeps T seconds in every step
Before a kill or stop the time is written to ``REXMOE_TEST_FAULT_LOG`` (the test times the exits).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _parse(spec: str) -> list[tuple[str, int, int, float]]:
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, arg = item.partition(":")
        if kind == "sleep":
            rank, _, seconds = arg.partition("=")
            faults.append((kind, int(rank), 0, float(seconds)))
        elif kind in ("kill", "stop", "raise"):
            rank, _, step = arg.partition("@")
            faults.append((kind, int(rank), int(step), 0.0))
        else:
            raise SystemExit(f"unknown fault {item!r}")
    return faults


def main() -> int:
    rank = int(os.environ.get("RANK", "0"))
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    mine = [f for f in _parse(os.environ.get("REXMOE_TEST_FAULT", "")) if f[1] == rank]
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.cli.train import main as train_main
    from rexmoe_train.training import trainer as trainer_module

    if not mine:
        return train_main(sys.argv[1:])
    state = {"step": 0, "calls": 0}
    train_step, forward_step = trainer_module.Trainer.train_step, trainer_module._forward_step

    def counted_train_step(self):
        state["step"], state["calls"] = self.step + 1, 0
        return train_step(self)

    def faulty_forward_step(data_iterator, model):
        state["calls"] += 1
        if state["calls"] == 1 and model.training:
            step = state["step"]
            for kind, _, at, seconds in mine:
                if kind == "sleep":
                    time.sleep(seconds)
                elif step == at and kind == "raise":
                    raise RuntimeError(f"injected fault on rank {rank} at step {step}")
                elif step == at and first_attempt:
                    with open(os.environ["REXMOE_TEST_FAULT_LOG"], "w") as f:
                        f.write(f"{time.time()}\n")
                    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        return forward_step(data_iterator, model)

    trainer_module.Trainer.train_step = counted_train_step
    trainer_module._forward_step = faulty_forward_step
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
