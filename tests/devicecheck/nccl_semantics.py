"""NCCL's host semantics on gloo, on top of the strict-device harness (strict_device.py): what gloo
hides is that on a GPU a collective does not block the host.

On a GPU, ``torch.distributed.all_reduce(t)`` (no ``async_op``) returns once the collective is queued on
NCCL's stream; the compute stream is made to wait for it *on the device*, and the host waits only at
its next synchronisation (``.item()``, ``.tolist()``, a copy to the host, ``nonzero``, ``Work.wait()``,
``torch.cuda.synchronize()``, ``Event.synchronize()``). gloo runs the collective on the calling thread,
so host time measured around a collective is the wait for the slowest rank on CPU, and ~0 on NCCL.

This mode models NCCL:
- every collective that moves tensors is queued to ONE worker thread per process and the call returns
  at once (with ``async_op=True``: a handle whose ``wait()`` waits). One FIFO per process keeps every
  rank's collectives in program order, as NCCL's stream does, so gloo pairs them as before;
- an op on a device tensor that shares storage with a queued collective's tensors waits for that
  collective (stream order; on a GPU the device would wait and the host run on, but ops here run
  eagerly on the host, which must wait for the data);
- a host read (the syncs above) waits for every queued collective;
- ``torch.cuda.Event`` is a model: ``record()`` notes the host time and the collectives still queued;
  the event's time is the later of the two (compute runs eagerly on the host, so the host time is the
  device time of the compute issued before it); ``elapsed_time`` refuses an event not yet passed, as
  CUDA does;
- collectives that move Python objects, ``barrier``, point-to-point ``isend``/``irecv``, group
  creation/destruction and any collective on megatron's gloo side groups (CPU tensors: gloo on a GPU
  machine too) drain the queue first and run on the caller (they synchronise on a GPU too);
- ``torch.distributed._coalescing_manager`` issues its collectives one by one into the queue (gloo's
  coalesced path would bypass the module functions; the reduced values are the same).

A fork (megatron's checkpoint writers) first waits for the collectives in flight; the child runs
collectives synchronously. An error in a queued collective is raised at the next synchronisation,
and by every later collective.
``set_async(False)`` turns the queue off (gloo semantics) for a comparison in the same process.
Install with :func:`install` instead of ``strict_device.install()``, before megatron is imported.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_flatten

from tests.devicecheck import strict_device as sd

# collectives that move tensors: queued
QUEUED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
          "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
          "_all_gather_base", "_reduce_scatter_base")
# the rest: run on the caller once the queue is empty
DRAINING = ("barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
            "scatter_object_list", "isend", "irecv", "batch_isend_irecv", "new_group", "new_subgroups",
            "destroy_process_group")
# ops whose result the host reads (torch syncs the stream for them)
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
              "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}
STATS = {"queued": 0, "waited_at_sync": 0, "waited_by_op": 0}

_queue: queue.Queue = queue.Queue()
_unfinished: list[_Queued] = []
_on_worker = threading.local()
_async = True
_failed: Optional[BaseException] = None
_worker: Optional[threading.Thread] = None
_INSTALLED = False


class _Queued:
    """One queued collective: done when the worker has run it (``done_at``: perf_counter then)."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.done = threading.Event()
        self.done_at = 0.0
        self.error: Optional[BaseException] = None
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error

    # a torch.distributed Work's API, for async_op=True callers
    def is_completed(self) -> bool:
        return self.done.is_set()

    def is_success(self) -> bool:
        return self.done.is_set() and self.error is None


class _Coalesced:
    """What ``_coalescing_manager`` yields: ``wait()`` waits for the collectives issued in the block."""

    def __init__(self) -> None:
        self.works: list[_Queued] = []

    def wait(self) -> None:
        for work in self.works:
            work.wait()

    def append(self, work: Any) -> None:
        if work is not None:
            self.works.append(work)


def _run_worker() -> None:
    global _failed
    _on_worker.active = True
    while True:
        call, item = _queue.get()
        try:
            if _failed is not None:
                raise _failed  # NCCL: an aborted communicator fails every later collective
            call()
        except BaseException as err:  # noqa: BLE001 -- handed to the waiter
            item.error = err
            _failed = _failed or err
        item.done_at = time.perf_counter()
        item.done.set()


def _pending() -> list[_Queued]:
    _unfinished[:] = [q for q in _unfinished if not q.done.is_set()]
    return list(_unfinished)


def synchronize() -> None:
    """The host waits for every queued collective (``torch.cuda.synchronize``)."""
    for item in _pending():
        STATS["waited_at_sync"] += 1
        item.wait()
    if _failed is not None:
        raise _failed


def set_async(enabled: bool) -> None:
    """Queue collectives (NCCL semantics, the default) or run them on the caller (gloo semantics)."""
    global _async
    synchronize()
    _async = enabled


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    flat, _ = tree_flatten(list(values))
    return [t for t in flat if isinstance(t, torch.Tensor)]


_coalescing = threading.local()


def _queued(name: str, fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        if getattr(_on_worker, "active", False) or not _async:
            return fn(*args, **kwargs)
        if _failed is not None:
            raise _failed
        bound = signature.bind_partial(*args, **kwargs)
        if bound.arguments.get("group") in sd._gloo_side_groups():  # gloo on a GPU machine too: synchronous
            synchronize()
            return fn(*args, **kwargs)
        async_op = bool(bound.arguments.pop("async_op", False))
        item = _Queued(_tensors(bound.arguments.values()))
        STATS["queued"] += 1
        _unfinished.append(item)
        _queue.put((functools.partial(fn, *bound.args, **bound.kwargs), item))
        cm = getattr(_coalescing, "cm", None)
        if cm is not None:
            cm.append(item)
        return item if async_op else None

    collective._rexmoe_nccl_semantics = True
    return collective


def _draining(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not getattr(_on_worker, "active", False):
            synchronize()
        return fn(*args, **kwargs)

    return call


@contextmanager
def _coalescing_manager(group: Any = None, device: Any = None, async_ops: bool = False):
    cm = _Coalesced()
    outer = getattr(_coalescing, "cm", None)
    _coalescing.cm = cm
    try:
        yield cm
    finally:
        _coalescing.cm = outer
    # async_ops=False: NCCL makes the stream wait, the host goes on; with the queue off, each ran already


def _storages(args: tuple, kwargs: dict) -> set[int]:
    return {t.elem.untyped_storage().data_ptr() for t in _tensors([args, kwargs]) if sd.is_device(t)}


def _copies_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "aten::_to_copy":
        device = kwargs.get("device")
        return device is not None and not sd._is_label(device)
    if name in ("aten::copy_", "aten::_copy_from"):
        return len(args) > 1 and not sd.is_device(args[0]) and sd.is_device(args[1])
    return False


def _before_op(func: Any, args: tuple, kwargs: dict) -> None:
    """strict_device's op hook: stream order for device ops, a sync for host reads."""
    if not _unfinished or getattr(_on_worker, "active", False):
        return
    name = None if func is None else func._schema.name
    if name is None or name in HOST_READS or _copies_to_host(name, args, kwargs):
        synchronize()
        return
    touched = _storages(args, kwargs)
    for item in _pending():
        if item.storages & touched:
            STATS["waited_by_op"] += 1
            item.wait()


def _before_fork() -> None:
    # megatron's async checkpoint forks writers: a child must not copy a collective half run by the
    # worker (the child has no worker: it would wait on it forever). Only the forking thread waits.
    if _worker is not None and threading.current_thread() is not _worker:
        for item in _pending():
            item.done.wait()


def _in_child() -> None:
    global _async, _worker
    _unfinished.clear()
    _async, _worker = False, None


class ModelEvent:
    """``torch.cuda.Event`` under this model (see the module docstring)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
                 **_: Any) -> None:
        self._host: Optional[float] = None
        self._after: tuple[_Queued, ...] = ()

    def record(self, stream: Any = None) -> None:
        self._host = time.perf_counter()
        self._after = tuple(_pending())

    def query(self) -> bool:
        return all(item.done.is_set() for item in self._after)

    def synchronize(self) -> None:
        for item in self._after:
            item.done.wait()

    def wait(self, stream: Any = None) -> None:
        pass  # a stream waits on the device; the host goes on

    def _time(self) -> float:
        if self._host is None:
            raise RuntimeError("event not recorded")
        if not self.query():
            raise RuntimeError("CUDA error: device not ready (elapsed_time of an event not yet passed)")
        return max([self._host] + [item.done_at for item in self._after])

    def elapsed_time(self, end: ModelEvent) -> float:
        return (end._time() - self._time()) * 1e3


def install() -> None:
    """compat, this model's collectives, then the strict-device harness on top (idempotent)."""
    global _INSTALLED, _worker
    if _INSTALLED:
        return
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from rexmoe_train import compat

    compat.install()
    for name in QUEUED:
        if hasattr(dist, name):
            setattr(dist, name, _queued(name, getattr(dist, name)))
    for name in DRAINING:
        if hasattr(dist, name):
            setattr(dist, name, _draining(getattr(dist, name)))
    dist._coalescing_manager = distributed_c10d._coalescing_manager = _coalescing_manager
    sd.install()  # wraps the functions above: its device checks run on the caller, before queueing
    sd.OP_HOOKS.append(_before_op)
    torch.cuda.Event = ModelEvent
    torch.cuda.synchronize = lambda *args, **kwargs: synchronize()
    _worker = threading.Thread(target=_run_worker, name="nccl-semantics", daemon=True)
    _worker.start()
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
    _INSTALLED = True
