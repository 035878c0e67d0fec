"""Every exit status a rexmoe process can end with, in one place: the launcher (cli/launch.py),
launch/slurm.sbatch (requeue on PREEMPTED) and users' scripts read these numbers, so each has exactly
one definition. Torch-free; the numbers are a public contract (docs/reliability.md)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # an unexpected exception: traceback under <run.dir>/logs/, a restart may help
    USAGE = 2  # bad config, input, checkpoint or lock: one line; a restart cannot fix it
    HALTED = 3  # too many non-finite steps (checkpoint.max_skipped_steps)
    PREEMPTED = 75  # SIGTERM/SIGUSR1 or the time budget: checkpoint saved, requeue me (EX_TEMPFAIL)
    HUNG = 76  # a section overran its watchdog budget: stacks dumped, restart me
    PEER_FAILED = 77  # a collective failed because another rank went away: not the cause
    HANGUP = 129  # SIGHUP (128 + 1: a closed terminal, a dropped ssh session): checkpoint saved; a
    #               user-side stop like Ctrl-C, so neither the launcher nor slurm.sbatch restarts it
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): checkpoint saved, do not restart


NO_RESTART = frozenset({ExitCode.USAGE, ExitCode.HALTED, ExitCode.PREEMPTED, ExitCode.HANGUP,
                        ExitCode.INTERRUPTED})
"""Codes the launcher passes through instead of restarting: the same run would end the same way, or
the user asked it to stop."""
