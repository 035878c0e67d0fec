"""The asynchronous half of a save: megatron-core's async dist-checkpointing request, run by a forked
writer per rank while training goes on, and a handle to the save in flight.

- The writer also digests the files it wrote (:func:`write_then_digest`), so each rank hashes its own
  shards and the training loop never waits for hashing; the digests come back through a pipe
  (:class:`DigestChannel`).
- :class:`SaveHandle` is the caller's view of one save, Future-like: ``done()`` asks (collective,
  one all_reduce while the write runs), ``wait()`` waits; a save that failed raises its one-line
  CheckpointError from whichever of the two saw it complete, never later from an unrelated call.
- A blocking save is the same request run here: megatron's ``AsyncRequest.execute_sync()``.

Why a fork (megatron's TemporalAsyncCaller) and not megatron's persistent worker: the fork is a
copy-on-write snapshot of this rank's state; the persistent (spawned) worker would receive CPU tensors
through shared memory that training keeps updating, i.e. no snapshot. On a GPU megatron copies the
state to host memory first (the request's preload step).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Optional

from rexmoe_train.checkpoint import layout
from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.checkpoint.faults import fault_point
from rexmoe_train.compat import require_installed

require_installed()  # megatron-facing

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest  # noqa: E402


def _set_parent_death_signal() -> None:
    """Linux: this (forked writer) process gets SIGKILL when the trainer dies, so a killed trainer
    does not leave a writer behind that keeps writing into a ``.tmp`` the next start removes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def write_then_digest(write_fn: Callable, sink: Callable[[dict], None], algorithm: str, step: int,
                      forked: bool, *args, **kwargs) -> None:
    """megatron's shard writer (``FileSystemWriterAsync.write_preloaded_data_multiproc``, args
    ``(rank, write_buckets, results_queue)``), then the size and content digest of each file this
    rank wrote, handed to ``sink``. A failed write sends nothing: megatron's finalize step reports the
    failure on every rank."""
    if forked:
        _set_parent_death_signal()
    write_fn(*args, **kwargs)
    fault_point("async_write", step)
    files = [(Path(bucket[0]), bucket[1]) for bucket in args[1]]
    try:
        digests = layout._parallel(lambda f: layout.file_digest(f[0], algorithm), files)
        sink({name: {"size": path.stat().st_size, algorithm: d} for (path, name), d in zip(files, digests)})
    except OSError:
        sink({})


class DigestChannel:
    """This rank's file digests from the writer: a pipe from the forked process, or a list in-process."""

    def __init__(self, forked: bool) -> None:
        self.forked = forked
        if forked:
            self._recv, self._send = multiprocessing.get_context("fork").Pipe(duplex=False)
            self.sink = self._send.send
        else:
            self._box: list = []
            self.sink = self._box.append

    def take(self) -> dict:
        """After the writer has finished (finalize runs only then): what it sent, {} if nothing."""
        if not self.forked:
            return self._box[0] if self._box else {}
        try:
            return self._recv.recv() if self._recv.poll() else {}
        except (EOFError, OSError):
            return {}
        finally:
            self._recv.close()
            self._send.close()


@dataclasses.dataclass
class SaveHandle:
    """One save, from the moment its shards are planned until its pointer moves (or it fails)."""

    step: int
    tmp: Path
    final: Path
    manifest: dict  # taken when the save started (skipped_steps moves on while the files are written)
    digests: DigestChannel
    started: float  # time.perf_counter() at the start of the save
    blocking_s: float = 0.0  # time the training loop spent in save() and in the wait that completed it
    polls_s: float = 0.0  # in done() calls that found the write still running (one all_reduce each)
    finished: bool = False
    error: Optional[str] = None  # the save's one-line failure, raised by done() / wait()
    _queue: Optional[AsyncSaveQueue] = dataclasses.field(default=None, repr=False)

    def complete(self, error: Optional[str]) -> None:
        """Called by the commit step (collective, every rank alike) when the save is over."""
        self.finished, self.error = True, error

    def done(self) -> bool:
        """Collective: completes the save if every rank's write is over (one all_reduce); True once
        it is complete. Raises the save's CheckpointError when it completed with one."""
        if not self.finished and self._queue is not None:
            self._queue.advance(blocking=False)
        self._raise()
        return self.finished

    def wait(self) -> None:
        """Collective: waits for every rank's write, completes the save; raises its CheckpointError."""
        if not self.finished and self._queue is not None:
            self._queue.advance(blocking=True)
        self._raise()

    def _raise(self) -> None:
        if self.finished and self.error:
            error, self.error = self.error, None  # raised once, where it is waited on
            raise CheckpointError(error)


class AsyncSaveQueue:
    """megatron's AsyncCallsQueue (non-persistent: a forked writer per save), one save at a time."""

    def __init__(self) -> None:
        self._calls: Optional[AsyncCallsQueue] = None

    def submit(self, request: AsyncRequest, handle: SaveHandle) -> SaveHandle:
        if self._calls is None:
            self._calls = AsyncCallsQueue(persistent=False)
        handle._queue = self
        self._calls.schedule_async_request(request)
        return handle

    def advance(self, blocking: bool) -> None:
        """megatron's finalize: once every rank's write is done (an all_reduce says so), the
        request's finalize steps run — ours commit the save and complete its handle."""
        if self._calls is not None and self._calls.get_num_unfinalized_calls():
            self._calls.maybe_finalize_async_calls(blocking=blocking)


def with_digests(request: AsyncRequest, handle: SaveHandle, commit: Callable[[SaveHandle, list], None],
                 forked: bool) -> AsyncRequest:
    """megatron's request with the writer followed by this rank's digests, and megatron's finalize
    steps (``.metadata``, ``metadata.json``) followed by ``commit(handle, megatron_finalize_fns)``."""
    write_fn = request.async_fn
    if write_fn is not None:
        write_fn = partial(write_then_digest, write_fn, handle.digests.sink, layout.hash_name(), handle.step,
                           forked)
    return AsyncRequest(write_fn, request.async_fn_args, [partial(commit, handle, list(request.finalize_fns))],
                        request.async_fn_kwargs, preload_fn=request.preload_fn)
