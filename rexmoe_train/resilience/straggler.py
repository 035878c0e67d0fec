"""Straggler report: which rank is persistently slower than the rest.

A synchronous step takes as long on every rank (the fast ranks wait for the slow one inside the
collectives), so wall-clock step time cannot name the slow rank. What differs is how long each rank
*waited*: busy time = step time - time blocked in torch.distributed collectives. ``CollectiveClock``
measures the blocked time by timing every blocking collective called through ``torch.distributed``
(megatron and this project call them as module attributes); asynchronous collectives (``async_op=True``,
whose wait happens later on the returned handle) are not counted, so with overlapped gradient reduction
on a GPU the busy time includes that wait (alike on every rank). megatron's DDP reduces gradients inside
``torch.distributed._coalescing_manager`` (the collective runs and is waited for when the block exits),
which it imports by name, and its sequence-parallel gathers call ``dist_all_gather_func`` /
``dist_reduce_scatter_func``, bound at import: those are timed in megatron's modules.

Every ``train.log_interval`` the ranks' mean busy time per step is gathered (a world-sized vector, in
the all_reduce that already finds the peak memory: no collective of its own); a rank above the median
by more than ``resilience.straggler_threshold`` (a fraction) and ``straggler_min_excess_s``, in all but
one of the last ``straggler_intervals`` logged intervals, is named in the log and in metrics.jsonl. (All
but one: on a shared machine one interval in which the OS delays another rank must neither hide a
straggler nor, alone, make one.)
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from contextlib import contextmanager
from statistics import median

import torch
import torch.distributed as dist

from rexmoe_train import platform

# the blocking collectives of torch.distributed's public API (those that exist in this torch)
TIMED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
         "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter",
         "barrier", "send", "recv", "all_gather_object", "broadcast_object_list")


class CollectiveClock:
    """Seconds the calling threads spent inside blocking torch.distributed collectives."""

    waited = 0.0
    calls = 0  # blocking collectives timed (for the overhead figure in bench/straggler_overhead.py)
    _local = threading.local()

    @classmethod
    def install(cls) -> None:
        for name in TIMED:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_rexmoe_timed", False):
                setattr(dist, name, cls._timed(fn))
        from megatron.core import utils as megatron_utils
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.tensor_parallel import mappings

        for module in (mappings, megatron_utils):  # megatron binds these two at import
            for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                fn = getattr(module, name, None)
                if fn is not None and not getattr(fn, "_rexmoe_timed", False):
                    setattr(module, name, cls._timed(fn))
        manager = getattr(param_and_grad_buffer, "_coalescing_manager", None)
        if manager is not None and not getattr(manager, "_rexmoe_timed", False):
            param_and_grad_buffer._coalescing_manager = cls._timed_block(manager)

    @classmethod
    @contextmanager
    def _measured(cls):
        """Count one blocking collective (or coalesced block) and the time this rank waited in it."""
        cls._local.inside = True
        start = time.perf_counter()
        try:
            yield
        finally:
            cls.waited += time.perf_counter() - start
            cls.calls += 1
            cls._local.inside = False

    @classmethod
    def _untimed(cls, kwargs: dict, async_key: str) -> bool:
        # async: waited on later; nested: counted by the outer call
        return bool(kwargs.get(async_key)) or getattr(cls._local, "inside", False)

    @classmethod
    def _timed_block(cls, manager):
        @contextmanager
        def timed(*args, **kwargs):
            if cls._untimed(kwargs, "async_ops"):
                with manager(*args, **kwargs) as cm:
                    yield cm
                return
            # the collectives queued inside run (and are waited for) at exit
            with cls._measured(), manager(*args, **kwargs) as cm:
                yield cm

        timed._rexmoe_timed = True
        return timed

    @classmethod
    def _timed(cls, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if cls._untimed(kwargs, "async_op"):
                return fn(*args, **kwargs)
            with cls._measured():
                return fn(*args, **kwargs)

        timed._rexmoe_timed = True
        return timed


class StragglerReport:
    def __init__(self, rank: int, world_size: int, threshold: float, min_excess_s: float, intervals: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.threshold, self.min_excess_s, self.intervals = threshold, min_excess_s, intervals
        self.recent = [deque(maxlen=intervals) for _ in range(world_size)]  # slow or not, per interval
        self.needed = intervals - 1 if intervals > 2 else intervals
        self._named: set[int] = set()
        self._new: list[int] = []
        self._busy = 0.0
        self._steps = 0
        self._waited_at_start = 0.0
        CollectiveClock.install()

    def step_started(self) -> None:
        self._waited_at_start = CollectiveClock.waited

    def step_ended(self, elapsed_s: float) -> None:
        self._busy += max(elapsed_s - (CollectiveClock.waited - self._waited_at_start), 0.0)
        self._steps += 1

    def local_vector(self) -> torch.Tensor:
        """This interval's mean busy time at this rank's index, zeros elsewhere: all_reduce(MAX) of it
        is the gather (busy times are >= 0). The trainer reduces it with the memory figure
        (metrics.throughput), so the report adds no collective of its own."""
        mine = torch.zeros(self.world_size, dtype=torch.float64, device=platform.device())
        mine[self.rank] = self._busy / max(self._steps, 1)
        self._busy, self._steps = 0.0, 0
        return mine

    def gather(self) -> dict:
        """Collective (every rank, at the same logged steps): the metrics.jsonl fields."""
        mine = self.local_vector()
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return self.judge(mine.tolist())

    def judge(self, busy: list[float]) -> dict:
        """Pure: update the streaks with one interval's per-rank busy times; the record fields."""
        mid = median(busy)
        slowest = max(range(len(busy)), key=busy.__getitem__)
        for r, b in enumerate(busy):
            self.recent[r].append(b > mid * (1 + self.threshold) and b - mid > self.min_excess_s)
        named = [r for r, recent in enumerate(self.recent) if sum(recent) >= self.needed]
        self._new = [r for r in named if r not in self._named]
        self._named = set(named)
        return {"busy_s_median": round(mid, 4), "busy_s_max": round(busy[slowest], 4),
                "busy_s_max_rank": slowest, "straggler": named}

    def newly_named(self) -> list[int]:
        """Ranks named by the last interval that were not named before (logged once per episode)."""
        return list(self._new)
