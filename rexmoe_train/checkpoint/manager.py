"""CheckpointManager: save and resume a run from its Stateful parts (state.py), atomically.

Save (collective: every rank calls it). Every rank writes its shards into ``<save>/iter_N.tmp``;
rank 0 then adds the resolved ``config.yaml`` and the manifest, fsyncs every file and the directory,
renames it to ``iter_N``, fsyncs ``<save>``, and only then replaces the pointer. Old ``iter_*`` dirs
are pruned after the new pointer is durable. A process killed at any point leaves the pointer naming
a complete checkpoint (tests/training/test_checkpoint.py kills it at every named point).

Load. Rank 0 checks the pointer, the manifest, the files and the model shape against the config
(compatibility.py) before ``dist_checkpointing.load`` reads anything; any problem is one
CheckpointError line.

Fault injection for the tests goes through :func:`set_fault_hook`: production code only names the
points of a save (``SAVE_POINTS``) and calls a hook that does nothing unless a test installs one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from rexmoe_train import platform
from rexmoe_train.checkpoint import compatibility, layout
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

SAVE_POINTS = ("start", "after_shards", "after_meta", "before_rename", "after_rename",
               "pointer_tmp", "after_pointer", "mid_prune")
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


class NonFiniteWeights(RuntimeError):
    """The weights are not finite: saving them would replace a good checkpoint with a bad one."""


@dataclasses.dataclass
class LoadResult:
    path: str
    meta: dict
    notes: list[str]


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

    def save(self) -> Path:
        """Save the state at ``train_state.step`` (collective)."""
        step = self.train_state.step
        root = self.root
        final, tmp = root / layout.iter_name(step), root / (layout.iter_name(step) + ".tmp")
        rank = dist.get_rank()
        if any_rank(not self.model.all_finite()):
            raise NonFiniteWeights(f"refusing to save a checkpoint at step {step}: the weights are not "
                                   "finite (the previous checkpoint is kept)")
        # Already saved (e.g. pre-empted right after a resume): nothing to do.
        skip = torch.zeros(1, device=platform.device())
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if (root / layout.TRACKER).exists() and final.is_dir():
                try:
                    skip[0] = float(layout.read_tracker(root) == step)
                except CheckpointError:
                    pass
            if not skip[0]:
                layout.remove_stale_tmp(root)
                tmp.mkdir()
        dist.broadcast(skip, src=0)
        if skip[0]:
            return final
        dist.barrier()
        _at("start", step)
        start = time.perf_counter()
        sd = self._sharded_state(is_loading=False, optimizer=True, rng=True)
        dist_checkpointing.save(sd, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                                validate_access_integrity=True)
        dist.barrier()
        _at("after_shards", step)
        chain = _global_max(chain_length(self.optimizer.optimizer))
        if rank == 0:
            self._finish(root, tmp, final, step, chain)
        dist.barrier()
        self.train_state.last_saved_step = step
        self.log(f"[checkpoint] saved step {step} to {final} in {time.perf_counter() - start:.1f} s")
        return final

    def _finish(self, root: Path, tmp: Path, final: Path, step: int, chain: int) -> None:
        """Rank 0: config, manifest, fsync, rename, pointer, prune."""
        from omegaconf import OmegaConf

        config = self.resolved_config or dataclasses.asdict(self.cfg)
        layout.write_durable(tmp / layout.CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)))
        layout.write_manifest(tmp, self._manifest(step, chain))
        _at("after_meta", step)
        layout.fsync_tree(tmp)
        _at("before_rename", step)
        if final.exists():  # a complete save of this step the pointer never named (killed before)
            shutil.rmtree(final)
        os.rename(tmp, final)
        layout.fsync_path(root)
        _at("after_rename", step)
        layout.replace_pointer(root, step, before_replace=lambda: _at("pointer_tmp", step))
        _at("after_pointer", step)
        layout.prune(root, step, self.cfg.checkpoint.keep_last_n, after_first=lambda: _at("mid_prune", step))

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
                    result = (str(ckpt), meta, None)
            except CheckpointError as err:
                result = (None, None, str(err))
        path, meta, error = _broadcast_object(result)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
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
        padded = meta.get("padded_vocab_size")
        if padded is not None and padded != self.padded_vocab_size:
            # megatron loads the embedding/output rows it has (allow_shape_mismatch); new rows are zero,
            # and their logits take part in the softmax: losses differ until they are trained.
            notes.append(f"padded vocab {padded} -> {self.padded_vocab_size} (new rows start at zero; set "
                         "model.make_vocab_size_divisible_by so that both layouts pad alike)")
        return LoadResult(path, meta, notes)

    def _read(self, sd: dict, path: str) -> dict:
        try:
            return dist_checkpointing.load(sd, path)
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint: one line, not a traceback
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
