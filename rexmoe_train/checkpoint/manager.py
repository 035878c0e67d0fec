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

Asynchronous saves (``checkpoint.async_save``): the shards are planned and ``common.pt`` written in
the training loop; a forked writer per rank writes and digests the shard files while training goes
on (async_save.py). The save is committed by :meth:`CheckpointManager.finalize` (collective; the
trainer calls it after every step without waiting, and waiting before a new save, the final save and
a pre-emption exit): once every rank's write is done, megatron writes ``.metadata``, the digests are
gathered to rank 0, and rank 0 writes the manifest, renames and replaces the pointer exactly as a
blocking save does. So the pointer never names a checkpoint whose files are not all written, and a
process killed while the background write runs leaves the previous checkpoint as the one that resumes
(the ``.tmp`` is removed at the next start). After an async save the older ``iter_*`` dirs are pruned
by a thread (joined before the next save renames anything, and by a blocking finalize). The points
where the tests inject faults are named in faults.py.
"""

from __future__ import annotations

import dataclasses
import os
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
from rexmoe_train.checkpoint.errors import CheckpointError, save_failure
from rexmoe_train.checkpoint.faults import fault_point as _at
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
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from rexmoe_train.checkpoint.async_save import AsyncSaveQueue, DigestChannel, SaveHandle, with_digests  # noqa: E402


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
        self._saves = AsyncSaveQueue()
        self._inflight: Optional[SaveHandle] = None  # the save not committed yet
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
        handle = SaveHandle(step, tmp, final, self._manifest(step, chain), DigestChannel(asynchronous), start)
        request = with_digests(request, handle, self._commit, forked=asynchronous)
        self.saved_step = step
        self._inflight = handle
        if asynchronous:
            self._saves.submit(request, handle)
            self._account(handle, time.perf_counter() - entered)
            return final
        try:
            request.execute_sync()  # write, barrier, megatron's finalize steps, then our commit
        finally:
            self._inflight = None
            self._account(handle, time.perf_counter() - entered)
        handle.wait()  # a failed commit raises here
        return final

    def _commit(self, handle: SaveHandle, megatron_finalize: list) -> None:
        """Collective, once every rank's shards are written: megatron's finalize steps, then rank 0
        writes the manifest from the gathered digests, renames and moves the pointer. The outcome (an
        error is one line, the same on every rank) completes ``handle``, which raises it where the
        save is waited on, outside megatron's queue."""
        step, tmp = handle.step, handle.tmp
        rank = dist.get_rank()
        error = None
        try:
            for fn in megatron_finalize:
                fn()
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a writer's OSError: one line
            error = self._save_failed(step, tmp, err)
        if error is None:
            _at("after_shards", step)
        mine = handle.digests.take()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (error, {} if error else mine))
        error = next((e for e, _ in gathered if e), None)
        if error is None and rank == 0:
            known = {}
            for _, digests in gathered:
                known.update(digests)
            try:
                self._finish(self.root, tmp, handle.final, step, handle.manifest, known,
                             prune_in_background=handle.digests.forked)
            except OSError as err:
                error = self._save_failed(step, tmp, err)
        error = _broadcast_object(error)
        if error:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            handle.complete(error)
            return
        dist.barrier()
        self.train_state.last_saved_step = step
        total = time.perf_counter() - handle.started
        self.save_times.append((step, handle.blocking_s, total, handle.polls_s))
        handle.complete(None)
        how = "in the background" if handle.digests.forked else "blocking"
        self.log(f"[checkpoint] saved step {step} to {handle.final} in {total:.1f} s ({how})")

    def finalize(self, blocking: bool = False) -> bool:
        """Complete the async save in flight once every rank's write is done (collective: every rank
        calls it at the same point; one all_reduce while a save is in flight, nothing otherwise).
        ``blocking`` waits for the writers. True when no save is left in flight. A failed save raises
        CheckpointError on every rank (the previous checkpoint and the pointer are untouched)."""
        handle = self._inflight
        if handle is None:
            if blocking:
                self._join_pruner()
            return True
        entered = time.perf_counter()
        try:
            if blocking:
                handle.wait()
            else:
                handle.done()
        finally:
            if handle.finished:
                self._inflight = None
                self._account(handle, time.perf_counter() - entered)
            else:
                handle.polls_s += time.perf_counter() - entered
            if blocking:
                self._join_pruner()
        return handle.finished

    def _account(self, handle: SaveHandle, seconds: float) -> None:
        """Time the training loop spent blocked on ``handle`` (save_times holds it once committed)."""
        handle.blocking_s += seconds
        if handle.finished and self.save_times and self.save_times[-1][0] == handle.step:
            step, _, total, polls = self.save_times[-1]
            self.save_times[-1] = (step, handle.blocking_s, total, polls)

    @property
    def save_in_flight(self) -> Optional[int]:
        """The step of the async save not committed yet, or None."""
        return self._inflight.step if self._inflight is not None else None

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
        """One line for an error during a save. The partial directory is not removed here: other
        ranks may still be writing into it (a rank that removed it made them fail on a missing
        directory instead of the real error); rank 0 removes it once every rank has reported."""
        kept = self.train_state.last_saved_step
        return (f"checkpoint error: saving step {step} failed: {save_failure(err, tmp, self.root)}; the previous "
                f"checkpoint ({'step ' + str(kept) if kept else 'none'}) and {layout.TRACKER} are untouched")

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
