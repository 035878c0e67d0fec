"""The trainer's intra-op thread count, chosen once and deliberately (torch + stdlib only).

WHY: left alone, torch sizes its OpenMP pool to every core of the machine and its threads spin
while they wait for each other. On a shared machine one other CPU-bound process then takes a core
from one of our threads, every parallel region waits for that thread, and a step becomes many
times slower (docs/benchmarks.md, "Threads on a busy machine"). So:

* the pool gets the cores this process may actually use (its CPU affinity mask, capped by a cgroup
  CPU quota), divided by the trainer processes on this node (torchrun's ``LOCAL_WORLD_SIZE``);
* an explicit choice wins: ``OMP_NUM_THREADS`` from the environment, then ``run.num_threads``;
* waiting threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) when the machine is
  busy at start, unless the user set a policy. The OpenMP runtime reads that variable once, when
  torch loads it, so :func:`prefer_passive_wait` must run before the first ``import torch``.

``launch/torchrun.sh`` exports its own per-process split as ``OMP_NUM_THREADS`` (torchrun would
otherwise force 1) and names it in ``REXMOE_LAUNCHER_OMP_NUM_THREADS``: a value equal to that is
the launcher's default, not the user's choice, so ``run.num_threads`` can still override it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["ThreadChoice", "ThreadsError", "available_cores", "cgroup_cpu_limit", "choose_threads",
           "parse_cfs_quota", "parse_cpu_max", "prefer_passive_wait", "set_intra_op_threads"]

LAUNCHER_MARK = "REXMOE_LAUNCHER_OMP_NUM_THREADS"


class ThreadsError(ValueError):
    """An explicit thread setting is invalid; the message is one line."""


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str


def parse_cpu_max(text: str) -> Optional[float]:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") -> CPUs, or None when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs_quota(quota_text: str, period_text: str) -> Optional[float]:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` -> CPUs, or None (quota -1: unlimited)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _dirs_up(mount: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's directory and its ancestors up to the mount: a parent's quota limits us too.
    Inside a container the recorded path may not exist under the mount (cgroup namespace), then
    only the existing ones (usually the mount itself) count."""
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its ancestors; None if none."""
    text = _read(Path(proc_cgroup))
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2 unified hierarchy
            mount = Path(root) if (Path(root) / "cgroup.controllers").exists() else Path(root) / "unified"
            for d in _dirs_up(mount, path):
                value = _read(d / "cpu.max")
                if value is not None and (cpus := parse_cpu_max(value)) is not None:
                    limits.append(cpus)
        elif "cpu" in controllers.split(","):  # v1 cpu controller (often mounted as cpu,cpuacct)
            mounts = [Path(root) / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            for mount in (m for m in mounts if m.is_dir()):
                for d in _dirs_up(mount, path):
                    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                    if quota is not None and period is not None:
                        if (cpus := parse_cfs_quota(quota, period)) is not None:
                            limits.append(cpus)
    return min(limits) if limits else None


def available_cores(affinity: Optional[int] = None, quota: Optional[float] = None) -> tuple[int, str]:
    """(cores this process may use, how that was found). Measured when not given."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    how = f"{affinity} in the CPU affinity mask"
    if quota is not None and max(1, math.floor(quota)) < affinity:
        # floor: a fractional CPU cannot host a thread that runs all the time without throttling
        return max(1, math.floor(quota)), f"{how}, cgroup CPU quota {quota:g}"
    return affinity, how


def _positive_int(name: str, value: str) -> int:
    first = value.split(",")[0].strip()  # OpenMP allows a per-nesting-level list: "4,2"
    try:
        n = int(first)
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadsError(f"{name}={value!r}: must be a positive integer (or unset to choose automatically)")
    return n


def choose_threads(env: Mapping[str, str], configured: Optional[int], cores: int, cores_how: str) -> ThreadChoice:
    """The intra-op thread count and why: OMP_NUM_THREADS set by the user, else ``run.num_threads``,
    else the available cores divided by the trainer processes on this node (at least 1)."""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp and omp != env.get(LAUNCHER_MARK):
        n = _positive_int("OMP_NUM_THREADS", omp)
        return ThreadChoice(n, f"OMP_NUM_THREADS={omp} in the environment")
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ThreadsError(f"config error: run.num_threads={configured!r}: must be >= 1 (null: automatic)")
        return ThreadChoice(configured, f"run.num_threads={configured}")
    local = _positive_int("LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", "1"))
    n = max(1, cores // local)
    return ThreadChoice(n, f"{cores} cores ({cores_how}) / {local} process{'es' if local > 1 else ''} "
                           "on this node")


def prefer_passive_wait(env: MutableMapping[str, str] = os.environ, load: Optional[float] = None,
                        cores: Optional[int] = None) -> tuple[Optional[str], str]:
    """Put waiting OpenMP threads to sleep when the machine is already busy, unless the user chose.

    Spinning waits are what make a shared machine 5-20x slower; on a quiet machine they are ~1.5x
    faster than sleeping (docs/benchmarks.md, "Threads on a busy machine"). So: ``PASSIVE`` when the
    1-minute load average at start is at least half the cores this process may use, the runtime's
    default otherwise; ``OMP_WAIT_POLICY`` from the environment always wins. Returns (the policy now
    in the environment or None, a reason for the log line). The runtime reads the variable once,
    when torch loads it: called after that, nothing changes."""
    if "OMP_WAIT_POLICY" in env:
        return env["OMP_WAIT_POLICY"], "OMP_WAIT_POLICY from the environment"
    if "torch" in sys.modules:
        return None, "OpenMP default wait (torch was loaded before the choice)"
    cores = cores or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if load is None else load
    if load >= cores / 2:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE", f"OMP_WAIT_POLICY=PASSIVE: load {load:.1f} on {cores} cores"
    return None, f"OpenMP default wait: load {load:.1f} on {cores} cores"


def set_intra_op_threads(configured: Optional[int] = None,
                         env: Mapping[str, str] = os.environ) -> ThreadChoice:
    """Choose (see :func:`choose_threads`) and apply the intra-op thread count of this process."""
    cores, how = available_cores(quota=cgroup_cpu_limit())
    choice = choose_threads(env, configured, cores, how)
    import torch  # here, not at the top: prefer_passive_wait must be able to run before torch loads

    torch.set_num_threads(choice.threads)
    return choice
