"""torchrun with rexmoe's failure handling: ``python -m rexmoe_train.cli.launch [torchrun options]
-m rexmoe_train.cli.train OVERRIDES...`` (launch/torchrun.sh and launch/slurm.sbatch call it).

It is torchrun (torch.distributed.run: the same options, elastic agent and c10d rendezvous) with the
agent subclass of resilience/launcher.py: one summary line per failed attempt, no restart for what a
restart cannot fix or what asked to stop (exit 2, 3, 75, 129, 130: passed through as this process's
exit code, where plain torchrun reports every failure as 1), the hang report after a watchdog exit, and
the reaper (a child subreaper: no process of the run outlives it). torchrun's own logging is kept to
errors (REXMOE_LAUNCH_VERBOSE=1 shows it). A signal to the launcher (SIGTERM, SIGINT, SIGHUP) is
forwarded to the workers, which save at their step boundary; it then exits 128 + the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.resilience.attempts import become_subreaper
from rexmoe_train.resilience.launcher import (
    PREFIX,
    TORCH_CHECKED_ON,
    RunPaths,
    describe_failure,  # noqa: F401 (the summary's building blocks, re-exported for tests and tools)
    make_agent_class,
    missing_torch_names,
    say,
)
from rexmoe_train.resilience.signals import leave_hung_terminal
from rexmoe_train.resilience.stray_errors import route_stray_errors


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
    route_stray_errors(os.path.join(paths.run_dir, "logs", launch, "launcher.stray.log") if paths.run_dir else None)
    if not os.environ.get("REXMOE_LAUNCH_VERBOSE"):  # torchrun's per-failure log lines: the summary says it
        for name in [*logging.Logger.manager.loggerDict, "torch.distributed.elastic"]:
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    missing = missing_torch_names()
    if missing:  # the summaries and the reaper may be incomplete; the run itself is torchrun's
        say(f"{PREFIX} warning: this torch lacks {', '.join(missing)} (checked on torch "
            f"{', '.join(TORCH_CHECKED_ON)}); failure summaries may be incomplete")
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
        if sig == signal.SIGHUP:  # the terminal may be gone: output (and the flush at exit) elsewhere
            leave_hung_terminal(os.path.join(paths.run_dir, "logs", launch, "launcher.out") if paths.run_dir else None)
        # the workers have saved at their step boundary (or were stopped at once by a second Ctrl-C)
        say(f"{PREFIX} stopped by {sig.name}; rerun to resume from {paths.resume_point()}")
        return 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
