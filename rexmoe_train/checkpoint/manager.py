"""CheckpointManager: save and resume a run from its Stateful parts (state.py), atomically.

Save (collective: every rank calls it). Every rank writes its shards into ``<save>/iter_N.tmp``;
rank 0 then adds the resolved ``config.yaml`` and the manifest, fsyncs every file and the directory,
renames it to ``iter_N``, fsyncs ``<save>``, and only then replaces the pointer. Old ``iter_*`` dirs
are pruned after the new pointer is durable. A process killed at any point leaves the pointer naming
a complete checkpoint (tests/training/test_checkpoint.py kills it at every named point).

Load. Rank 0 checks the pointer, the manifest (and its signature when ``REXMOE_CHECKPOINT_KEY`` is
set), every file's content digest, the model shape and the fields a resume may not change against
the config (compatibility.py) before ``dist_checkpointing.load`` unpickles or reads anything; any
problem is one CheckpointError line.

A save is skipped only when the checkpoint of this step on disk is verified to be the one this
process loaded (same manifest digest, files re-verified, pointer naming it); otherwise the step is
written again (e.g. after loading an older checkpoint, or a damaged newer one). An OSError during a
save (ENOSPC...) is one CheckpointError line naming the path and errno; the partial ``.tmp`` is
removed and the previous checkpoint and pointer are untouched.

Asynchronous saves (``checkpoint.async_save``, megatron-core's async dist-checkpointing). The shards
are planned and ``common.pt`` written in the training loop; the shard files are then written by a
forked process (megatron's TemporalAsyncCaller: the fork is a copy-on-write snapshot of this rank's
state on CPU; on a GPU megatron copies the state to host memory first) while training continues.
That process also hashes the files it wrote, so each rank digests its own shards. The checkpoint is
finalized by :meth:`CheckpointManager.finalize` (collective; the trainer calls it after every step
without waiting, and waiting before a new save, the final save and a pre-emption exit): once every
rank's write is done, megatron writes ``.metadata``, the digests are gathered to rank 0, and rank 0
writes the manifest, renames and replaces the pointer exactly as a blocking save does. So the
pointer never names a checkpoint whose files are not all written, and a process killed while the
background write runs leaves the previous checkpoint as the one that resumes (the ``.tmp`` is
removed at the next start). After an async save the older ``iter_*`` dirs are pruned by a thread
(joined before the next save renames anything, and by a blocking finalize). The persistent (spawned)
worker is not used: it would receive CPU tensors through shared memory that training keeps
updating, i.e. no snapshot.

Fault injection for the tests goes through :func:`set_fault_hook`: production code only names the
points of a save (``SAVE_POINTS``; ``WRITER_POINTS`` run in the process that writes the shards) and
calls a hook that does nothing unless a test installs one.
"""

from __future__ import annotations

import dataclasses
import errno as errno_names
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from rexmoe_train import platform
from rexmoe_train.checkpoint import compatibility, layout, resume
from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.checkpoint.state import (
    DataPosition,
    ModelState,
    OptimizerState,
    RNGState,
    SchedulerState,
    TrainState,
    chain_length,
)
from rexmoe_train.compat import require_installed

require_installed()  # megatron-facing

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy  # noqa: E402
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

SAVE_POINTS = ("start", "after_shards", "after_meta", "before_rename", "after_rename",
               "pointer_tmp", "after_pointer", "mid_prune")
# in the shard-writing process (forked for an async save), after this rank's shard files are written
# and before their digests: the save is not finalized, the pointer names the previous checkpoint
WRITER_POINTS = ("async_write",)
_fault_hook: Optional[Callable[[str, int], None]] = None


def set_fault_hook(hook: Optional[Callable[[str, int], None]]) -> None:
    """Test seam: ``hook(point, step)`` runs at each of SAVE_POINTS (e.g. to SIGKILL the process)."""
    global _fault_hook
    _fault_hook = hook


def _at(point: str, step: int) -> None:
    if _fault_hook is not None:
        _fault_hook(point, step)


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _global_max(value: int) -> int:
    t = torch.tensor([float(value)], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: itself, a cause/context, or one of the per-rank failures torch's
    CheckpointException (a BaseException) collects as (exception, traceback) pairs. megatron's async
    file writer re-raises a worker's OSError as ``RuntimeError("Worker failure: [Errno 28] ...")``:
    the errno is read back from that text."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if isinstance(e, tuple):  # torch's WRAPPED_EXCEPTION
            e = e[0] if e else None
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        found = _ERRNO_TEXT.search(str(e))
        if found:
            return OSError(int(found.group(1)), found.group(2).strip())
        stack += [e.__cause__, e.__context__]
        stack += list(getattr(e, "failures", {}).values())
    return None


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\n]+)")


def describe_os_error(err: OSError, fallback: Path) -> str:
    name = errno_names.errorcode.get(err.errno, str(err.errno))
    return f"{err.filename or fallback}: [{name}] {err.strerror or err}"


def _set_parent_death_signal() -> None:
    """Linux: this (forked writer) process gets SIGKILL when the trainer dies, so a killed trainer
    does not leave a writer behind that keeps writing into a ``.tmp`` the next start removes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _write_then_digest(write_fn: Callable, sink: Callable[[dict], None], algorithm: str, step: int,
                       forked: bool, *args, **kwargs) -> None:
    """megatron's shard writer (``FileSystemWriterAsync.write_preloaded_data_multiproc``, args
    ``(rank, write_buckets, results_queue)``), then the size and content digest of each file this
    rank wrote, handed to ``sink``. Runs in the forked writer process for an async save, so the
    training loop never waits for hashing. A failed write sends nothing: megatron's finalize step
    reports the failure on every rank."""
    if forked:
        _set_parent_death_signal()
    write_fn(*args, **kwargs)
    _at("async_write", step)
    files = [(Path(bucket[0]), bucket[1]) for bucket in args[1]]
    try:
        digests = layout._parallel(lambda f: layout.file_digest(f[0], algorithm), files)
        sink({name: {"size": path.stat().st_size, algorithm: d} for (path, name), d in zip(files, digests)})
    except OSError:
        sink({})


class _Digests:
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
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    manifest: dict  # taken when the save started (skipped_steps moves on while the files are written)
    digests: _Digests
    started: float  # time.perf_counter() at the start of the save
    blocking_s: float = 0.0  # time the training loop spent in save() and in the finalize() that completed it
    polls_s: float = 0.0  # in finalize() calls that found a write still running (one all_reduce each)


class NonFiniteWeights(RuntimeError):
    """The weights are not finite: saving them would replace a good checkpoint with a bad one."""


@dataclasses.dataclass
class LoadResult:
    path: str
    meta: dict
    notes: list[str]
    changes: list[str] = dataclasses.field(default_factory=list)  # fields the resume applies, one line each


class CheckpointManager:
    def __init__(self, cfg, *, train_state: TrainState, chunks: list, optimizer, scheduler,
                 vocab_size: int, padded_vocab_size: int, resolved_config: Optional[dict] = None,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.train_state = train_state
        metadata = compatibility.sharding_metadata(cfg)
        self.model = ModelState(chunks, metadata)
        self.optimizer = OptimizerState(optimizer, metadata)
        self.scheduler = SchedulerState(scheduler)
        self.rng = RNGState()
        self.data = DataPosition(cfg.train.global_batch_size)
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.resolved_config = resolved_config
        self.log = log
        self.root = layout.save_root(cfg)
        self.loaded: Optional[tuple[int, str]] = None  # (step, manifest digest) of what load() read
        self.saved_step: Optional[int] = None  # the step this process wrote (or verified on disk)
        self._async_calls: Optional[AsyncCallsQueue] = None  # created at the first async save
        self._pending: Optional[_PendingSave] = None  # the async save not finalized yet
        self._finalize_error: Optional[str] = None
        self._config_yaml: Optional[str] = None  # config.yaml of every save (the config does not change)
        self._pruner: Optional[threading.Thread] = None  # an async save's pruning of older iter_* dirs
        # per finalized save: (step, seconds the training loop was blocked by save() and the finalize()
        # that completed it, seconds from start to pointer, seconds in finalize() polls before that)
        self.save_times: list[tuple[int, float, float, float]] = []

    # ----------------------------------------------------------------------------------------------
    def _sharded_state(self, *, is_loading: bool, optimizer: bool, rng: bool) -> dict:
        sd: dict[str, Any] = {}
        sd.update(self.model.entries(is_loading, sd))
        if optimizer:
            sd.update(self.optimizer.entries(is_loading, sd))
        sd.update(self.scheduler.entries(is_loading, sd))
        sd.update(self.train_state.entries(is_loading, sd))
        if rng:
            sd.update(self.rng.entries(is_loading, sd))
        return sd

    def _manifest(self, step: int, chain: int) -> dict:
        cfg = self.cfg
        return {
            "format": layout.FORMAT_VERSION,
            "step": step,
            "skipped_steps": self.train_state.skipped_steps,
            "consumed_samples": self.data.consumed_samples(step),
            "model": compatibility.model_signature(cfg, self.vocab_size),
            "parallel": compatibility.parallel_signature(cfg, dist.get_world_size()),
            "optimizer_sharding": compatibility.sharding_metadata(cfg),
            "optimizer_chain": chain,
            "padded_vocab_size": self.padded_vocab_size,
            "num_model_chunks": len(self.model.chunks),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "megatron_backend": "torch_dist",
        }

    def save(self, blocking: Optional[bool] = None) -> Path:
        """Save the state at ``train_state.step`` (collective). ``blocking=None`` follows
        ``checkpoint.async_save``: an async save returns once the shard writer is started, and
        :meth:`finalize` completes it; ``blocking=True`` returns with the pointer naming the step.
        A save still in flight is finalized first (one save in flight at a time)."""
        entered = time.perf_counter()
        self.finalize(blocking=True)
        asynchronous = self.cfg.checkpoint.async_save if blocking is None else not blocking
        step = self.train_state.step
        root = self.root
        final, tmp = root / layout.iter_name(step), root / (layout.iter_name(step) + ".tmp")
        rank = dist.get_rank()
        if any_rank(not self.model.all_finite()):
            raise NonFiniteWeights(f"refusing to save a checkpoint at step {step}: the weights are not "
                                   "finite (the previous checkpoint is kept)")
        # Already saved: only when the checkpoint of this step on disk is the one this process loaded
        # (e.g. pre-empted right after a resume). Anything else (an older checkpoint loaded, a damaged
        # or different one under this step's name) is written again.
        decision: tuple = (False, None)
        if rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if self._on_disk_is_loaded(step, final):
                    decision = (True, None)
                else:
                    layout.remove_stale_tmp(root)
                    tmp.mkdir()
            except OSError as err:
                decision = (False, self._save_failed(step, tmp, err))
                shutil.rmtree(tmp, ignore_errors=True)  # no other rank has written into it yet
        skip, error = _broadcast_object(decision)
        if error:
            raise CheckpointError(error)
        if skip:
            self.saved_step = step
            return final
        dist.barrier()
        start = time.perf_counter()
        error, request = None, None
        try:
            _at("start", step)
            sd = self._sharded_state(is_loading=False, optimizer=True, rng=True)
            # megatron plans the save and writes common.pt here; the shards are written by `request`
            request = dist_checkpointing.save(
                sd, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                validate_access_integrity=True, async_sharded_save=True)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - ENOSPC & co.: see _save_failed
            error = self._save_failed(step, tmp, err)
        # every rank learns whether any rank failed (a rank that raised alone would hang the others)
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
        if error:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(error)
        chain = _global_max(chain_length(self.optimizer.optimizer))
        pending = _PendingSave(step, tmp, final, self._manifest(step, chain), _Digests(asynchronous), start)
        request = self._with_digests_and_finalize(request, pending, forked=asynchronous)
        self.saved_step = step
        if asynchronous:
            if self._async_calls is None:
                self._async_calls = AsyncCallsQueue(persistent=False)
            self._async_calls.schedule_async_request(request)
            self._pending = pending
            self._account(pending, time.perf_counter() - entered)
            return final
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()
        if request.async_fn is not None:
            request.async_fn(*args, **request.async_fn_kwargs)
        dist.barrier()
        self._pending = pending
        for finalize_fn in request.finalize_fns:
            finalize_fn()
        self._account(pending, time.perf_counter() - entered)
        self._raise_finalize_error()
        return final

    def _with_digests_and_finalize(self, request: AsyncRequest, pending: _PendingSave, forked: bool) -> AsyncRequest:
        """megatron's request with the writer followed by this rank's digests, and megatron's
        finalize steps (``.metadata``, ``metadata.json``) followed by the manifest, rename and pointer."""
        write_fn = request.async_fn
        if write_fn is not None:
            write_fn = partial(_write_then_digest, write_fn, pending.digests.sink, layout.hash_name(),
                               pending.step, forked)
        finalize = partial(self._finalize_save, pending, list(request.finalize_fns))
        return AsyncRequest(write_fn, request.async_fn_args, [finalize], request.async_fn_kwargs,
                            preload_fn=request.preload_fn)

    def _finalize_save(self, pending: _PendingSave, megatron_finalize: list) -> None:
        """Collective, once every rank's shards are written: megatron's finalize steps, then rank 0
        writes the manifest from the gathered digests, renames and moves the pointer. Errors are kept
        in ``_finalize_error`` (one line, the same on every rank) and raised by the caller, outside
        megatron's queue."""
        step, tmp = pending.step, pending.tmp
        rank = dist.get_rank()
        error = None
        try:
            for fn in megatron_finalize:
                fn()
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a writer's OSError: one line
            error = self._save_failed(step, tmp, err)
        if error is None:
            _at("after_shards", step)
        mine = pending.digests.take()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (error, {} if error else mine))
        error = next((e for e, _ in gathered if e), None)
        if error is None and rank == 0:
            known = {}
            for _, digests in gathered:
                known.update(digests)
            try:
                self._finish(self.root, tmp, pending.final, step, pending.manifest, known,
                             prune_in_background=pending.digests.forked)
            except OSError as err:
                error = self._save_failed(step, tmp, err)
        error = _broadcast_object(error)
        self._pending = None
        if error:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._finalize_error = error
            return
        dist.barrier()
        self.train_state.last_saved_step = step
        total = time.perf_counter() - pending.started
        self.save_times.append((step, pending.blocking_s, total, pending.polls_s))
        how = "in the background" if pending.digests.forked else "blocking"
        self.log(f"[checkpoint] saved step {step} to {pending.final} in {total:.1f} s ({how})")

    def finalize(self, blocking: bool = False) -> bool:
        """Complete the async save in flight once every rank's write is done (collective: every rank
        calls it at the same point; one all_reduce while a save is in flight, nothing otherwise).
        ``blocking`` waits for the writers. True when no save is left in flight. A failed save raises
        CheckpointError on every rank (the previous checkpoint and the pointer are untouched)."""
        if self._async_calls is None or not self._async_calls.get_num_unfinalized_calls():
            if blocking:
                self._join_pruner()
            return True
        entered, pending = time.perf_counter(), self._pending
        self._async_calls.maybe_finalize_async_calls(blocking=blocking)
        if pending is not None and self._pending is pending:  # still written: this was a poll
            pending.polls_s += time.perf_counter() - entered
        elif pending is not None:
            self._account(pending, time.perf_counter() - entered)
        if blocking:
            self._join_pruner()
        self._raise_finalize_error()
        return not self._async_calls.get_num_unfinalized_calls()

    def _account(self, pending: _PendingSave, seconds: float) -> None:
        """Time the training loop spent blocked on ``pending`` (save_times holds it once finalized)."""
        pending.blocking_s += seconds
        if self.save_times and self.save_times[-1][0] == pending.step and self._pending is None:
            step, _, total, polls = self.save_times[-1]
            self.save_times[-1] = (step, pending.blocking_s, total, polls)

    @property
    def save_in_flight(self) -> Optional[int]:
        """The step of the async save not finalized yet, or None."""
        return self._pending.step if self._pending is not None else None

    def _raise_finalize_error(self) -> None:
        error, self._finalize_error = self._finalize_error, None
        if error:
            raise CheckpointError(error)

    def _on_disk_is_loaded(self, step: int, final: Path) -> bool:
        """Rank 0: the pointer names ``step`` and ``final`` is, byte for byte, what load() read."""
        if self.loaded is None or self.loaded[0] != step or not (self.root / layout.TRACKER).exists():
            return False
        try:
            if layout.read_tracker(self.root) != step:
                return False
            meta = layout.read_metadata(final)  # re-verifies every file's digest
        except CheckpointError:
            return False
        return meta["_digest"] == self.loaded[1]

    def _save_failed(self, step: int, tmp: Path, err: BaseException) -> str:
        """One line for an OS error during a save. The partial directory is not removed here: other
        ranks may still be writing into it (a rank that removed it made them fail on a missing
        directory instead of the real error); rank 0 removes it once every rank has reported."""
        os_err = _os_error(err)
        if os_err is None and _nearly_full(self.root):
            # a full disk also surfaces without an errno (torch's zip writer: "unexpected pos")
            os_err = OSError(errno_names.ENOSPC, os.strerror(errno_names.ENOSPC))
        if os_err is not None:
            where = describe_os_error(os_err, tmp)
        else:
            where = f"{tmp}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        kept = self.train_state.last_saved_step
        return (f"checkpoint error: saving step {step} failed: {where}; the previous checkpoint "
                f"({'step ' + str(kept) if kept else 'none'}) and {layout.TRACKER} are untouched")

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _finish(self, root: Path, tmp: Path, final: Path, step: int, manifest: dict, known: dict,
                prune_in_background: bool = False) -> None:
        """Rank 0: config, manifest (``known``: the digests each rank computed of its own files),
        fsync, rename, pointer, prune."""
        from omegaconf import OmegaConf

        if self._config_yaml is None:
            config = self.resolved_config or dataclasses.asdict(self.cfg)
            self._config_yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        self._join_pruner()  # the previous save's pruning, before this one renames and prunes
        layout.write_durable(tmp / layout.CONFIG, self._config_yaml)
        layout.write_manifest(tmp, manifest, known=known)
        _at("after_meta", step)
        layout.fsync_tree(tmp)
        _at("before_rename", step)
        if final.exists():
            # a save of this step that is not what this process loaded (never named by the pointer,
            # or damaged, or another timeline's): moved aside under a name remove_stale_tmp drops,
            # replaced, then deleted
            aside = root / (final.name + ".replaced.tmp")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        layout.fsync_path(root)
        _at("after_rename", step)
        layout.replace_pointer(root, step, before_replace=lambda: _at("pointer_tmp", step))
        _at("after_pointer", step)
        prune = partial(layout.prune, root, step, self.cfg.checkpoint.keep_last_n,
                        after_first=lambda: _at("mid_prune", step))
        if prune_in_background:  # unlinking a large checkpoint is not the training loop's business
            self._pruner = threading.Thread(target=prune, name="rexmoe-checkpoint-prune")
            self._pruner.start()
        else:
            prune()

    # ----------------------------------------------------------------------------------------------
    def load(self) -> Optional[LoadResult]:
        """Resume from checkpoint.load / the save dir (collective). None for a fresh start. Every
        check runs before anything is read into the model."""
        cfg = self.cfg
        world = dist.get_world_size()
        result: tuple = (None, None, None)
        chain = _global_max(chain_length(self.optimizer.optimizer))
        if dist.get_rank() == 0:
            try:
                ckpt = layout.locate(cfg)
                if ckpt is not None:
                    meta = compatibility.validate_for_load(cfg, ckpt, self.vocab_size, world, chain)
                    changes = [] if meta.get("model_only") else self._resume_changes(ckpt)
                    result = (str(ckpt), meta, None, changes)
            except CheckpointError as err:
                result = (None, None, str(err), None)
        path, meta, error, changes = _broadcast_object(result + (None,) * (4 - len(result)))
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        self.loaded = (int(meta["step"]), meta["_digest"])
        if meta.get("model_only"):
            return self._load_model_only(path, meta)
        current = compatibility.parallel_signature(cfg, world)
        with_optimizer = cfg.checkpoint.load_optimizer
        same_layout = meta["parallel"] == current
        sd = self._sharded_state(is_loading=True, optimizer=with_optimizer, rng=same_layout)
        state = self._read(sd, path)
        if int(state["step"]) != meta["step"]:
            raise CheckpointError(f"checkpoint error: {path}: step {state['step']} in the state, "
                                  f"{meta['step']} in {layout.META}")
        self.model.load(state)
        if with_optimizer:
            self.optimizer.load(state)
        else:
            self.optimizer.skip()
        try:
            self.scheduler.load(state)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace("checkpoint error: ", f"checkpoint error: {path}: ", 1)) from None
        if same_layout:
            self.rng.load(state)
        self.train_state.load(state)
        self.train_state.last_saved_step = self.train_state.step
        notes = []
        if not with_optimizer:
            notes.append("optimizer state not loaded")
        if not same_layout:
            notes.append("resharded from " + compatibility._describe_layout(meta["parallel"]) +
                         f", world {meta['parallel']['world_size']}; RNG state not restored")
            dp_change = compatibility.data_parallel_change(cfg, meta, world)
            if dp_change:
                notes.append(dp_change)
        padded = meta.get("padded_vocab_size")
        if padded is not None and padded != self.padded_vocab_size:
            # megatron loads the embedding/output rows it has (allow_shape_mismatch); new rows are zero,
            # and their logits take part in the softmax: losses differ until they are trained.
            notes.append(f"padded vocab {padded} -> {self.padded_vocab_size} (new rows start at zero; set "
                         "model.make_vocab_size_divisible_by so that both layouts pad alike)")
        return LoadResult(path, meta, notes, changes or [])

    def _resume_changes(self, ckpt: Path) -> list[str]:
        """Rank 0: the checkpoint's config.yaml (verified with the other files) against this run's."""
        from omegaconf import OmegaConf

        path = ckpt / layout.CONFIG
        if not path.exists():  # written before config.yaml was saved with the weights
            return []
        try:
            saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:  # noqa: BLE001 - yaml / omegaconf errors: one line
            raise CheckpointError(f"checkpoint error: {path}: unreadable ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:200]})") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint error: {path}: not a mapping")
        return resume.compare(saved, dataclasses.asdict(self.cfg), str(ckpt))

    def _read(self, sd: dict, path: str) -> dict:
        try:
            return dist_checkpointing.load(sd, path)
        # torch's CheckpointException derives from BaseException: name it, or it escapes as a traceback
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - one line, not a traceback
            line = " ".join(str(err).split())[:400]
            raise CheckpointError(f"checkpoint error: {path} could not be loaded: "
                                  f"{type(err).__name__}: {line}") from None

    def _load_model_only(self, path: str, meta: dict) -> LoadResult:
        """A checkpoint written by rexmoe-convert (import-hf, upcycle): weights only. Training starts
        from its step with a fresh optimizer; the LR schedule is advanced to that step."""
        state = self._read(self.model.entries(True, {}), path)
        self.model.load(state)
        self.optimizer.skip()
        self.train_state.step = int(meta["step"])
        self.scheduler.advance_to(self.train_state.step)
        self.train_state.skipped_steps = 0
        self.train_state.last_saved_step = self.train_state.step
        notes = [f"model-only checkpoint ({meta.get('source', 'converted')}): fresh optimizer "
                 f"from step {self.train_state.step}"]
        return LoadResult(path, meta, notes)
