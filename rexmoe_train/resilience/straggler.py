"""Straggler report: which rank is persistently slower than the rest.

A synchronous step takes as long on every rank (the fast ranks wait for the slow one inside the
collectives), so wall-clock step time cannot name the slow rank. What differs is how long each rank
*waited*: busy time = step time - time blocked in torch.distributed collectives. ``CollectiveClock``
wraps every blocking collective called through ``torch.distributed`` (megatron and this project call
them as module attributes); asynchronous collectives (``async_op=True``, whose wait happens later on the
returned handle) are not counted, so with overlapped gradient reduction the busy time includes that wait
(alike on every rank). megatron's DDP reduces gradients inside ``torch.distributed._coalescing_manager``
(the collectives are issued in the block and waited for when it exits), which it imports by name, and
its sequence-parallel gathers call ``dist_all_gather_func`` / ``dist_reduce_scatter_func``, bound at
import: those are wrapped in megatron's modules.

Two clocks, one rule:
- CPU (gloo): a collective returns when it is complete, so the host time inside it is the wait. The
  step time is the host's.
- GPU (NCCL): a collective returns to the host as soon as it is queued; the *compute stream* waits for
  it, and the host only at the next ``.item()``/``.tolist()``. Host time inside the call is ~0 on every
  rank, so the host clock would name nobody. Here the clock records a CUDA event on the current stream
  before and after each collective (the stream reaches the second one when the collective is done,
  including the wait for the slowest peer) and around the step; busy = device step time - device time
  in collectives. Events are read back on logged steps (or earlier once complete): no sync of its own.
  WHY events rather than the flight recorder's ``duration_ms``: that needs ``TORCH_NCCL_ENABLE_TIMING``
  (events on every collective of every group anyway) and a JSON dump of the whole ring per read; and
  "time of the last compute kernel" would still include the waits, as compute after an all-to-all
  starts only when the slowest rank's tokens arrive. (A collective issued on a side stream while the
  current stream computes would be subtracted although it overlapped: not done by this project.)

Every ``train.log_interval`` the ranks' mean busy time per step is gathered (a world-sized vector, in
the all_reduce that already finds the peak memory: no collective of its own); a rank above the median
by more than ``resilience.straggler_threshold`` (a fraction) and ``straggler_min_excess_s``, in all but
one of the last ``straggler_intervals`` logged intervals, is named in the log and in metrics.jsonl. (All
but one: on a shared machine one interval in which the OS delays another rank must neither hide a
straggler nor, alone, make one.) tests/devicecheck/nccl_semantics.py runs this under NCCL's semantics.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from contextlib import contextmanager
from statistics import median
from typing import Optional

import torch
import torch.distributed as dist

from rexmoe_train import platform

# the blocking collectives of torch.distributed's public API (those that exist in this torch)
TIMED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
         "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter",
         "barrier", "send", "recv", "all_gather_object", "broadcast_object_list")


class CollectiveClock:
    """Seconds the calling threads spent inside blocking torch.distributed collectives (host clock),
    and with ``on_device`` the (start, end) device events around each of them (device clock)."""

    waited = 0.0
    calls = 0  # blocking collectives timed (for the overhead figure in bench/straggler_overhead.py)
    on_device = False  # record device events around each collective (StragglerReport sets it)
    spans: list = []  # device clock: (start, end) events of the collectives since the step started
    _pool: list = []  # events read back, for reuse (a collective costs two event records, no allocation)
    _local = threading.local()

    @classmethod
    def event(cls):
        """A timing event recorded on the current stream now."""
        event = cls._pool.pop() if cls._pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @classmethod
    def release(cls, events) -> None:
        cls._pool.extend(events)

    @classmethod
    def take_spans(cls) -> list:
        spans, cls.spans = cls.spans, []
        return spans

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
        first = cls.event() if cls.on_device else None
        try:
            yield
        finally:
            if first is not None:  # the stream passes this event once the collective has completed
                cls.spans.append((first, cls.event()))
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
    """``on_device``: time on the device (CUDA events; NCCL semantics) instead of the host; default:
    whether this process computes on an accelerator (``platform.device()``)."""

    def __init__(self, rank: int, world_size: int, threshold: float, min_excess_s: float, intervals: int,
                 on_device: Optional[bool] = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.threshold, self.min_excess_s, self.intervals = threshold, min_excess_s, intervals
        self.recent = [deque(maxlen=intervals) for _ in range(world_size)]  # slow or not, per interval
        self.needed = intervals - 1 if intervals > 2 else intervals
        self._named: set[int] = set()
        self._new: list[int] = []
        self._busy = 0.0
        self._steps = 0
        self._waited_at_start = 0.0
        self.on_device = platform.device().type != "cpu" if on_device is None else on_device
        self._step_start = None  # device clock: the open step's start event
        self._recorded: list = []  # device clock: (start, end, spans) of steps not read back yet
        CollectiveClock.install()
        CollectiveClock.on_device = self.on_device

    def step_started(self) -> None:
        self._waited_at_start = CollectiveClock.waited
        if self.on_device:
            self._read_device_steps(wait=False)  # those complete by now: bounds the events held
            spans = CollectiveClock.take_spans()  # collectives between steps (eval, save, the gather)
            CollectiveClock.release(e for span in spans for e in span)
            self._step_start = CollectiveClock.event()

    def step_ended(self, elapsed_s: float) -> None:
        """``elapsed_s``: the host's step time (used by the host clock)."""
        if self.on_device and self._step_start is not None:
            self._recorded.append((self._step_start, CollectiveClock.event(), CollectiveClock.take_spans()))
            self._step_start = None
            return
        self._busy += max(elapsed_s - (CollectiveClock.waited - self._waited_at_start), 0.0)
        self._steps += 1

    def _read_device_steps(self, wait: bool) -> None:
        """Device clock: add the recorded steps' busy time (in order; ``wait=False``: only those whose
        end event the stream has passed)."""
        while self._recorded:
            start, end, spans = self._recorded[0]
            if not wait and not end.query():
                return
            end.synchronize()
            waited_ms = 0.0
            for first, last in spans:
                last.synchronize()  # a collective on a side stream may end after the step's end event
                waited_ms += first.elapsed_time(last)
            self._busy += max(start.elapsed_time(end) - waited_ms, 0.0) / 1e3
            self._steps += 1
            self._recorded.pop(0)
            CollectiveClock.release([start, end, *(e for span in spans for e in span)])

    def local_vector(self) -> torch.Tensor:
        """This interval's mean busy time at this rank's index, zeros elsewhere: all_reduce(MAX) of it
        is the gather (busy times are >= 0). The trainer reduces it with the memory figure
        (metrics.throughput), so the report adds no collective of its own."""
        self._read_device_steps(wait=True)  # on a logged step, whose loss the host has read already
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
