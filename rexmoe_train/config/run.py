"""The ``run:``, ``checkpoint:`` and ``resilience:`` sections: where a run lives, how it is saved,
and the timeouts and watchdog budgets that keep it alive."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from rexmoe_train.config.fields import WANDB_MODES, _at_least, _fail, _one_of, _positive
from rexmoe_train.core.errors import ConfigError

_WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's own spellings of WANDB_MODE


def default_wandb_mode() -> str:
    """$WANDB_MODE when set (wandb's own variable, the usual switch on a cluster or in a test suite;
    its aliases dryrun and run accepted), else offline. An explicit run.wandb.mode wins over it."""
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    return _WANDB_ALIASES.get(value, value) or "offline"


@dataclass
class WandbConfig:
    # online only when asked: no account, key or network needed by default
    mode: str = field(default_factory=default_wandb_mode)
    project: str = "rexmoe"
    name: Optional[str] = None

    def validate(self, path: str = "run.wandb") -> None:
        if self.mode not in WANDB_MODES and os.environ.get("WANDB_MODE") and self.mode == default_wandb_mode():
            raise ConfigError(f"config error: WANDB_MODE={os.environ['WANDB_MODE']!r} (the default of "
                              f"{path}.mode): must be one of {', '.join(WANDB_MODES)} (or wandb's dryrun, run)")
        _one_of(f"{path}.mode", self.mode, WANDB_MODES)


@dataclass
class RunConfig:
    dir: Optional[str] = "runs/default"  # rexmoe-train: null derives runs/<model>-r<r>[-<hash>]
    progress: bool = True
    dry_run: bool = False  # validate, print layout / placement / parameter and memory estimates, exit
    # collapse alarm: warn when one expert takes more than this share of a reuse group's assignments
    # on this many consecutive logged steps (spec §4: large r collapses onto a few experts)
    collapse_share: float = 0.5
    collapse_intervals: int = 3
    # intra-op (OpenMP) threads per process; None: the cores this process may use / the processes on
    # this node (rexmoe_train/threads.py). OMP_NUM_THREADS set in the environment wins over both.
    num_threads: Optional[int] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, path: str = "run") -> None:
        if not self.dir:
            _fail(f"{path}.dir", self.dir, "must be a non-empty path")
        if not 0 < self.collapse_share <= 1:
            _fail(f"{path}.collapse_share", self.collapse_share, "must be in (0, 1]")
        _at_least(f"{path}.collapse_intervals", self.collapse_intervals, 1)
        if self.num_threads is not None:
            _at_least(f"{path}.num_threads", self.num_threads, 1)
        self.wandb.validate(f"{path}.wandb")


@dataclass
class CheckpointConfig:
    """Checkpoints (megatron dist_checkpointing, torch_dist), resume, pre-emption, numerics guard.

    See docs/reliability.md. Exit status 75 means "pre-empted or out of time, checkpoint saved"."""

    save: Optional[str] = None  # None: <run.dir>/checkpoints
    load: Optional[str] = None  # None: resume from `save` if it holds latest_checkpointed_iteration.txt
    save_interval: int = 0  # steps between saves; 0: only at the end and on pre-emption
    # also save at the first step boundary this many minutes after the last save (or the start), by
    # rank 0's clock; with save_interval, whichever comes first. null: steps only
    save_interval_minutes: Optional[float] = None
    keep_last_n: Optional[int] = 3  # iter_* dirs kept after a save; None keeps all
    load_optimizer: bool = True  # false: load model, LR schedule and step only (any layout)
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1: save at the next step boundary, exit 75
    exit_duration_mins: Optional[float] = None  # wall-clock budget: save and exit 75 when spent
    max_skipped_steps: int = 10  # non-finite loss/grad-norm steps skipped before halting
    # Interval saves are written by a background process (megatron's async save) while training goes
    # on; the pointer moves only once every rank's files are written and verified. The final and the
    # pre-emption saves are always waited for. On by default: the guarantees are those of a blocking
    # save, and the cost is one host copy of this rank's state while it is written (docs/reliability.md).
    async_save: bool = True

    def validate(self, path: str = "checkpoint") -> None:
        for name in ("save", "load"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                _fail(f"{path}.{name}", value, "must be null or a non-empty path")
        _at_least(f"{path}.save_interval", self.save_interval, 0)
        if self.save_interval_minutes is not None and not (
                math.isfinite(self.save_interval_minutes) and self.save_interval_minutes > 0):
            _fail(f"{path}.save_interval_minutes", self.save_interval_minutes, "must be null or a finite number > 0")
        if self.keep_last_n is not None:
            _at_least(f"{path}.keep_last_n", self.keep_last_n, 1)
        if self.exit_duration_mins is not None and not (
                math.isfinite(self.exit_duration_mins) and self.exit_duration_mins > 0):
            _fail(f"{path}.exit_duration_mins", self.exit_duration_mins, "must be null or a finite number > 0")
        _at_least(f"{path}.max_skipped_steps", self.max_skipped_steps, 0)


@dataclass
class ResilienceConfig:
    """Collective timeouts, the hang watchdog and the straggler report (resilience/watchdog.py,
    resilience/straggler.py; docs/reliability.md). Times in seconds; a budget of null turns its check off."""

    # collective timeout while starting (process groups, data, checkpoint load, the first step),
    # then the tighter one once training runs, and a longer one around saves (raised for the save and
    # its blocking finalize, then set back): a collective blocked this long raises on every rank
    init_timeout_s: float = 900.0
    train_timeout_s: float = 600.0
    save_collective_timeout_s: float = 2400.0
    # watchdog budgets: a section that overruns dumps every live rank's stacks and flight-recorder
    # trace under <run.dir>/hang/ and exits 76 (the launcher restarts). Each strictly below the
    # collective timeout live in it (the ladder, docs/reliability.md), so the evidence is written before
    # NCCL's own timeout aborts every rank. Sections before the first step ends (the first step, the
    # step-0 evaluation, a save) get at least first_step_timeout_s (warm-up, compilation).
    step_timeout_s: Optional[float] = 300.0
    eval_timeout_s: Optional[float] = 300.0
    save_timeout_s: Optional[float] = 1800.0
    first_step_timeout_s: float = 840.0
    # straggler report: every train.log_interval the per-rank busy time per step (step time less the
    # time spent waiting in collectives) is gathered; a rank slower than the median by more than
    # straggler_threshold (a fraction) and straggler_min_excess_s, for straggler_intervals logged
    # intervals in a row, is named in the log and in metrics.jsonl ("straggler")
    straggler_report: bool = True
    straggler_threshold: float = 0.25
    straggler_min_excess_s: float = 0.05
    straggler_intervals: int = 5

    def validate(self, path: str = "resilience") -> None:
        for name in ("init_timeout_s", "train_timeout_s", "save_collective_timeout_s", "first_step_timeout_s"):
            _positive(f"{path}.{name}", getattr(self, name))
        for name in ("step_timeout_s", "eval_timeout_s", "save_timeout_s"):
            if getattr(self, name) is not None:
                _positive(f"{path}.{name}", getattr(self, name))
        for budget, timeout in self.ladder():
            if getattr(self, budget) is not None and not getattr(self, budget) < getattr(self, timeout):
                raise ConfigError(
                    f"config error: {path}.{budget}={getattr(self, budget)!r} must be below {path}.{timeout}="
                    f"{getattr(self, timeout)!r} (a watchdog budget below the collective timeout live in its "
                    "section, so the stacks are dumped before the collective times out)")
        _positive(f"{path}.straggler_threshold", self.straggler_threshold)
        _at_least(f"{path}.straggler_min_excess_s", self.straggler_min_excess_s, 0.0)
        _at_least(f"{path}.straggler_intervals", self.straggler_intervals, 1)

    @staticmethod
    def ladder() -> tuple[tuple[str, str], ...]:
        """(watchdog budget, the collective timeout live while it runs): in training, then in start-up,
        where every section's budget is at least first_step_timeout_s (and a save raises the timeout)."""
        return (("step_timeout_s", "train_timeout_s"), ("eval_timeout_s", "train_timeout_s"),
                ("save_timeout_s", "save_collective_timeout_s"), ("first_step_timeout_s", "init_timeout_s"),
                ("step_timeout_s", "init_timeout_s"), ("eval_timeout_s", "init_timeout_s"),
                ("first_step_timeout_s", "save_collective_timeout_s"))
