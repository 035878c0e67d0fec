"""Checkpoints, resume, pre-emption and the numerics guard (docs/reliability.md).

Layout (as Megatron-LM)::

    <save>/latest_checkpointed_iteration.txt     the step of the newest complete checkpoint
    <save>/iter_0000100/                         megatron dist_checkpointing, torch_dist backend
        __*.distcp, .metadata, metadata.json, common.pt     (written by dist_checkpointing)
        rexmoe_checkpoint.json                   model shape, parallel layout, file sizes
        config.yaml                              the resolved config of the run that saved it

Every rank writes its shards into ``<save>/iter_0000100.tmp``; rank 0 then adds the metadata JSON,
fsyncs every file and the directory, renames it to ``iter_0000100``, fsyncs ``<save>``, and only then
replaces the pointer (temp file + fsync + ``os.replace`` + fsync). Old ``iter_*`` dirs are pruned
after the new pointer is durable. A process killed at any point leaves the pointer naming a complete
checkpoint.

Before ``dist_checkpointing.load`` rank 0 checks the pointer, the metadata JSON, the files' sizes and
the model shape against the config; any problem is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: E402

from rexmoe_train import platform

EXIT_PREEMPTED = 75  # pre-empted (signal) or out of time: checkpoint saved, requeue me
EXIT_HALTED = 3  # too many non-finite steps
TRACKER = "latest_checkpointed_iteration.txt"
META = "rexmoe_checkpoint.json"
CONFIG = "config.yaml"
FORMAT_VERSION = 1
KILL_ENV = "REXMOE_CKPT_KILL_AT"  # test hook: "<point>" or "<point>@<step>": SIGKILL self there
KILL_POINTS = ("start", "after_shards", "after_meta", "before_rename", "after_rename",
               "pointer_tmp", "after_pointer", "mid_prune")


def sharding_metadata(cfg) -> dict:
    """The metadata for the model's and the optimizer's sharded_state_dict. Non-distributed optimizer:
    per-parameter state under layout-free keys (no `chained_<i>.` prefix). Distributed optimizer:
    megatron's dp_reshardable buffers (the only format that works with torch Adam on 0.16)."""
    if cfg.parallel.use_distributed_optimizer:
        return {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}
    return {"chained_optim_avoid_prefix": True}


def optimizer_chain_length(optimizer) -> int:
    """How many optimizers megatron chains on this rank: 2 when the model has experts (they have
    their own, at every ep: model/experts.py), else 1. Their common state only loads into the same
    structure (checkpoints written before the experts always had their own optimizer have 1)."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded. The message is one line naming what is wrong."""


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps). One line."""


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def save_root(cfg) -> Path:
    return Path(cfg.checkpoint.save or os.path.join(cfg.run.dir, "checkpoints"))


def _kill_point(point: str, step: int) -> None:
    """Test hook: SIGKILL this process at a named point of a save (env REXMOE_CKPT_KILL_AT)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# durable small writes
# --------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _file_sizes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == META:
                continue
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


# --------------------------------------------------------------------------------------------------
# what a checkpoint is: its metadata
# --------------------------------------------------------------------------------------------------
def model_signature(cfg, vocab_size: int) -> dict[str, Any]:
    """The fields that decide parameter shapes (a checkpoint loads only into the same values)."""
    m, r = cfg.model, cfg.rexmoe
    return {
        "model.num_layers": m.num_layers,
        "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups or m.num_attention_heads,
        "model.ffn_hidden_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "model.num_moe_experts": m.num_moe_experts,
        "model.moe_ffn_hidden_size": m.moe_ffn_hidden_size,
        "model.moe_shared_expert_intermediate_size": m.moe_shared_expert_intermediate_size,
        "model.first_k_dense_layers": m.first_k_dense_layers,
        "model.normalization": m.normalization,
        "model.qk_layernorm": m.qk_layernorm,
        "model.head_dim": m.head_dim,
        "model.untie_embeddings_and_output_weights": m.untie_embeddings_and_output_weights,
        "model.vocab_size": vocab_size,
        "rexmoe.reuse_group_size": r.reuse_group_size,
        "rexmoe.allow_partial_last_group": r.allow_partial_last_group,
    }


def parallel_signature(cfg, world_size: int) -> dict[str, Any]:
    p = cfg.parallel
    return {
        "world_size": world_size,
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
        "data_parallel_size": cfg.data_parallel_size(world_size),
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }


def _optimizer_layout(par: dict) -> tuple:
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
            "expert_tensor_parallel_size")
    return tuple(par[k] for k in keys)


def _describe_layout(par: dict) -> str:
    kind = "distributed" if par["use_distributed_optimizer"] else "non-distributed"
    return (f"{kind} optimizer, tp={par['tensor_model_parallel_size']} "
            f"pp={par['pipeline_model_parallel_size']} vpp={par['virtual_pipeline_model_parallel_size']} "
            f"ep={par['expert_model_parallel_size']} etp={par['expert_tensor_parallel_size']}")


def optimizer_compatible(saved: dict, current: dict) -> bool:
    """Non-distributed optimizer state is stored per parameter (model space): any layout.
    Distributed-optimizer state (dp_reshardable) follows its grad buffers: same TP/PP/VPP/EP/ETP."""
    if saved["use_distributed_optimizer"] != current["use_distributed_optimizer"]:
        return False
    if not current["use_distributed_optimizer"]:
        return True
    return _optimizer_layout(saved) == _optimizer_layout(current)


def _implied_by_older_checkpoints(saved: dict) -> dict[str, Any]:
    """Signature fields added after checkpoints were first written, with the value those implied."""
    implied: dict[str, Any] = {"model.qk_layernorm": False}
    if "model.hidden_size" in saved and "model.num_attention_heads" in saved:
        implied["model.head_dim"] = saved["model.hidden_size"] // saved["model.num_attention_heads"]
    return implied


def compare_model(saved: dict, current: dict) -> list[str]:
    diffs = []
    saved = _implied_by_older_checkpoints(saved) | saved
    for key in current:
        if key not in saved:
            diffs.append(f"{key}: missing in checkpoint, config {current[key]!r}")
        elif saved[key] != current[key]:
            diffs.append(f"{key}: checkpoint {saved[key]!r}, config {current[key]!r}")
    return diffs


# --------------------------------------------------------------------------------------------------
# finding and validating a checkpoint (rank 0, before dist_checkpointing.load)
# --------------------------------------------------------------------------------------------------
def read_tracker(root: Path) -> int:
    path = root / TRACKER
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise CheckpointError(f"checkpoint error: cannot read {path}: {err.strerror}") from None
    if not text.isdigit():
        raise CheckpointError(f"checkpoint error: {path} must hold a step number, found {text[:40]!r}")
    return int(text)


def locate(cfg) -> Optional[Path]:
    """The iter dir to resume from, or None for a fresh start. Raises CheckpointError."""
    ck = cfg.checkpoint
    if ck.load is None:
        root = save_root(cfg)
        if not (root / TRACKER).exists():
            return None
        return root / iter_name(read_tracker(root))
    path = Path(ck.load)
    if not path.exists():
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: not a directory")
    if (path / TRACKER).exists():
        return path / iter_name(read_tracker(path))
    if (path / META).exists():
        return path
    raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: neither a checkpoint "
                          f"directory ({TRACKER}) nor an iter_* directory ({META})")


def read_metadata(ckpt: Path) -> dict:
    """Parse and check the metadata JSON and that every file it lists is there, whole."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint error: {ckpt} does not exist (the pointer names a missing "
                              "checkpoint)")
    path = ckpt / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {META} is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint error: {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint error: {path}: unknown format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT_VERSION}")
    for key in ("step", "model", "parallel", "files"):
        if key not in meta:
            raise CheckpointError(f"checkpoint error: {path}: field {key!r} is missing")
    if not isinstance(meta["step"], int) or meta["step"] < 1:
        raise CheckpointError(f"checkpoint error: {path}: step must be a positive integer, "
                              f"found {meta['step']!r}")
    for name, size in sorted(meta["files"].items()):
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint error: {ckpt} is damaged: {name} has "
                                  f"{p.stat().st_size} bytes, expected {size} (truncated?)")
    return meta


def validate_for_load(cfg, ckpt: Path, vocab_size: int, world_size: int,
                      optimizer_chain: Optional[int] = None) -> dict:
    meta = read_metadata(ckpt)
    suffix = ckpt.name[len("iter_"):] if ckpt.name.startswith("iter_") else ""
    re_step = int(suffix) if suffix.isdigit() else None
    if re_step is not None and re_step != meta["step"]:
        raise CheckpointError(f"checkpoint error: {ckpt}: directory name says step {re_step}, "
                              f"{META} says {meta['step']}")
    diffs = compare_model(meta["model"], model_signature(cfg, vocab_size))
    if diffs:
        raise CheckpointError(f"checkpoint error: {ckpt} was saved for another model: " + "; ".join(diffs))
    if meta["step"] > cfg.train.train_iters:
        raise CheckpointError(f"checkpoint error: {ckpt} is at step {meta['step']}, past "
                              f"train.train_iters={cfg.train.train_iters}")
    if meta.get("model_only"):  # written by rexmoe-convert: weights only, any layout
        return meta
    current = parallel_signature(cfg, world_size)
    if cfg.checkpoint.load_optimizer and not optimizer_compatible(meta["parallel"], current):
        raise CheckpointError(
            f"checkpoint error: {ckpt}: optimizer state saved with {_describe_layout(meta['parallel'])} "
            f"cannot be loaded with {_describe_layout(current)}; set checkpoint.load_optimizer=false to "
            "load the model, LR schedule and step only")
    saved_chain = meta.get("optimizer_chain")
    if cfg.checkpoint.load_optimizer and optimizer_chain is not None and saved_chain != optimizer_chain:
        raise CheckpointError(
            f"checkpoint error: {ckpt}: optimizer state saved by {saved_chain} chained optimizer(s) "
            f"cannot be loaded into {optimizer_chain} (the experts have their own optimizer at every "
            "expert_model_parallel_size; ep=1 checkpoints written before that hold 1); set "
            "checkpoint.load_optimizer=false to load the model, LR schedule and step only")
    return meta


# --------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    return {"platform": platform.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    platform.set_rng_state(state["platform"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _init_distributed_optimizer_state(optimizer) -> None:
    """Before a load, the DistributedOptimizer builds its state dict from the inner torch Adam's
    state, which is empty until the first step (and megatron's init_state_fn sets no 'step')."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.optimizer is None:
            continue
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                    inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)


def _restore_distributed_optimizer_steps(optimizer) -> None:
    """After a dp_reshardable load, megatron copies each param's Adam 'step' from the (local,
    non-persistent) pre-load value; the saved step is in the param groups. Put it back."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.optimizer is None:
            continue
        inner = sub.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _sharded_state(trainer, *, is_loading: bool, optimizer: bool, rng: bool) -> dict:
    chunks = trainer.model.chunks  # unwrapped GPTModels: the same parameter objects DDP wraps
    sd: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        sd[_model_key(i, len(chunks))] = chunk.sharded_state_dict(metadata=sharding_metadata(trainer.cfg))
    if optimizer:
        if is_loading:
            _init_distributed_optimizer_state(trainer.optimizer)
        sd["optimizer"] = trainer.optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata=sharding_metadata(trainer.cfg))
    sd["opt_param_scheduler"] = trainer.scheduler.state_dict()
    sd["step"] = trainer.step
    sd["skipped_steps"] = trainer.skipped_steps
    if rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def _local_params_finite(trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for chunk in trainer.model.chunks for p in chunk.parameters())


def _global_max(value: int) -> int:
    t = torch.tensor([float(value)], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------
def save_checkpoint(trainer) -> Path:
    """Save trainer state at ``trainer.step`` (collective: every rank calls it)."""
    cfg, step = trainer.cfg, trainer.step
    root = save_root(cfg)
    final, tmp = root / iter_name(step), root / (iter_name(step) + ".tmp")
    rank = dist.get_rank()
    if any_rank(not _local_params_finite(trainer)):
        raise TrainingHalted(f"refusing to save a checkpoint at step {step}: the weights are not "
                             "finite (the previous checkpoint is kept)")
    # Already saved (e.g. pre-empted right after a resume): nothing to do.
    skip = torch.zeros(1, device=platform.device())
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if (root / TRACKER).exists() and final.is_dir():
            try:
                skip[0] = float(read_tracker(root) == step)
            except CheckpointError:
                pass
        if not skip[0]:
            for stale in root.glob("iter_*.tmp"):  # left by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    dist.broadcast(skip, src=0)
    if skip[0]:
        return final
    dist.barrier()
    _kill_point("start", step)
    start = time.perf_counter()
    sd = _sharded_state(trainer, is_loading=False, optimizer=True, rng=True)
    dist_checkpointing.save(sd, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                            validate_access_integrity=True)
    dist.barrier()
    _kill_point("after_shards", step)
    chain = _global_max(optimizer_chain_length(trainer.optimizer))
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "skipped_steps": trainer.skipped_steps,
            "consumed_samples": step * cfg.train.global_batch_size,
            "model": model_signature(cfg, trainer.vocab_size),
            "parallel": parallel_signature(cfg, dist.get_world_size()),
            "optimizer_sharding": sharding_metadata(cfg),
            "optimizer_chain": chain,
            "padded_vocab_size": trainer.model.vocab_size,
            "num_model_chunks": len(trainer.chunks),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "megatron_backend": "torch_dist",
        }
        config = trainer.resolved_config or dataclasses.asdict(cfg)
        from omegaconf import OmegaConf

        _write_durable(tmp / CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)))
        meta["files"] = _file_sizes(tmp)
        _write_durable(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _kill_point("after_meta", step)
        _fsync_tree(tmp)
        _kill_point("before_rename", step)
        if final.exists():  # a complete save of this step the pointer never named (killed before)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(root)
        _kill_point("after_rename", step)
        pointer_tmp = root / (TRACKER + ".tmp")
        _write_durable(pointer_tmp, f"{step}\n")
        _kill_point("pointer_tmp", step)
        os.replace(pointer_tmp, root / TRACKER)
        _fsync_path(root)
        _kill_point("after_pointer", step)
        _prune(root, step, cfg.checkpoint.keep_last_n)
    dist.barrier()
    trainer.last_saved_step = step
    trainer.logger.message(f"[checkpoint] saved step {step} to {final} in "
                           f"{time.perf_counter() - start:.1f} s")
    return final


def _prune(root: Path, step: int, keep_last_n: Optional[int]) -> None:
    """Remove the oldest iter_* dirs before ``step`` so that keep_last_n remain (the new one
    included). Dirs of later steps (an abandoned timeline) are left alone."""
    if keep_last_n is None:
        return
    older = []
    for d in root.glob("iter_*"):
        suffix = d.name[len("iter_"):]
        if d.is_dir() and suffix.isdigit() and int(suffix) < step:
            older.append((int(suffix), d))
    older.sort()
    doomed = older[: max(0, len(older) - (keep_last_n - 1))]
    for i, (_, d) in enumerate(doomed):
        shutil.rmtree(d, ignore_errors=True)
        if i == 0:
            _kill_point("mid_prune", step)


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def _broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(trainer) -> Optional[dict]:
    """Resume ``trainer`` from checkpoint.load / the save dir (collective). Returns the metadata, or
    None for a fresh start. Every check runs before anything is read into the model."""
    cfg = trainer.cfg
    world = dist.get_world_size()
    result: tuple = (None, None, None)
    chain = _global_max(optimizer_chain_length(trainer.optimizer))
    if dist.get_rank() == 0:
        try:
            ckpt = locate(cfg)
            if ckpt is not None:
                result = (str(ckpt), validate_for_load(cfg, ckpt, trainer.vocab_size, world, chain), None)
        except CheckpointError as err:
            result = (None, None, str(err))
    path, meta, error = _broadcast_object(result)
    if error:
        raise CheckpointError(error)
    if path is None:
        return None
    if meta.get("model_only"):
        return _load_model_only(trainer, path, meta)
    current = parallel_signature(cfg, world)
    with_optimizer = cfg.checkpoint.load_optimizer
    same_layout = meta["parallel"] == current
    sd = _sharded_state(trainer, is_loading=True, optimizer=with_optimizer, rng=same_layout)
    try:
        state = dist_checkpointing.load(sd, path)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint: one line, not a traceback
        line = " ".join(str(err).split())[:400]
        raise CheckpointError(f"checkpoint error: {path} could not be loaded: "
                              f"{type(err).__name__}: {line}") from None
    if int(state["step"]) != meta["step"]:
        raise CheckpointError(f"checkpoint error: {path}: step {state['step']} in the state, "
                              f"{meta['step']} in {META}")
    chunks = trainer.model.chunks
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[_model_key(i, len(chunks))], strict=True)
    if with_optimizer:
        with torch.no_grad():
            trainer.optimizer.load_state_dict(state["optimizer"])
        _restore_distributed_optimizer_steps(trainer.optimizer)
    else:
        trainer.optimizer.reload_model_params()
    try:
        trainer.scheduler.load_state_dict(state["opt_param_scheduler"])
    except AssertionError as err:
        raise CheckpointError(f"checkpoint error: {path}: the LR schedule differs from the "
                              f"checkpoint's ({' '.join(str(err).split())})") from None
    if same_layout:
        _set_rng_state(state["rng_state"])
    trainer.step = int(state["step"])
    trainer.skipped_steps = int(state["skipped_steps"])
    trainer.last_saved_step = trainer.step
    notes = []
    if not with_optimizer:
        notes.append("optimizer state not loaded")
    if not same_layout:
        notes.append("resharded from " + _describe_layout(meta["parallel"]) +
                     f", world {meta['parallel']['world_size']}; RNG state not restored")
    padded = meta.get("padded_vocab_size")
    if padded is not None and padded != trainer.model.vocab_size:
        # megatron loads the embedding/output rows it has (allow_shape_mismatch); new rows are zero,
        # and their logits take part in the softmax: losses differ until they are trained.
        notes.append(f"padded vocab {padded} -> {trainer.model.vocab_size} (new rows start at zero; set "
                     "model.make_vocab_size_divisible_by so that both layouts pad alike)")
    meta["notes"] = notes
    meta["path"] = path
    return meta


def _load_model_only(trainer, path: str, meta: dict) -> dict:
    """A checkpoint written by rexmoe-convert (import-hf, upcycle): weights only. Training starts
    from its step with a fresh optimizer; the LR schedule is advanced to that step."""
    chunks = trainer.model.chunks
    sd = {_model_key(i, len(chunks)): chunk.sharded_state_dict(metadata=sharding_metadata(trainer.cfg))
          for i, chunk in enumerate(chunks)}
    try:
        state = dist_checkpointing.load(sd, path)
    except Exception as err:  # noqa: BLE001 - one line, not a traceback
        line = " ".join(str(err).split())[:400]
        raise CheckpointError(f"checkpoint error: {path} could not be loaded: "
                              f"{type(err).__name__}: {line}") from None
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[_model_key(i, len(chunks))], strict=True)
    trainer.optimizer.reload_model_params()
    trainer.step = int(meta["step"])
    if trainer.step:
        trainer.scheduler.step(increment=trainer.step)
    trainer.skipped_steps = 0
    trainer.last_saved_step = trainer.step
    meta["notes"] = [f"model-only checkpoint ({meta.get('source', 'converted')}): fresh optimizer "
                     f"from step {trainer.step}"]
    meta["path"] = path
    return meta


def trim_metrics(run_dir: str, step: int) -> None:
    """On resume, drop metrics.jsonl records past the checkpoint's step (they will be redone), so the
    file reads as if the run had never stopped. Rank 0 only."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line torn by the kill: drop it
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    _write_durable(tmp, "".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# pre-emption and the numerics guard
# --------------------------------------------------------------------------------------------------
class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the trainer acts on it at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool, exit_duration_mins: Optional[float], start_time: float) -> None:
        self.enabled = enabled
        self.deadline = None if exit_duration_mins is None else start_time + 60.0 * exit_duration_mins
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def local_flags(self) -> tuple[bool, bool]:
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        return self.received is not None, out_of_time


def local_step_is_bad(losses: list, chunks: list) -> bool:
    """This rank's view: a non-finite micro-batch loss (last stage) or a non-finite gradient in the
    DDP grad buffers (after the DP reduction)."""
    for d in losses or []:
        if "lm loss" in d and not bool(torch.isfinite(torch.as_tensor(d["lm loss"])).all()):
            return True
    for chunk in chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buf.grad_data).all()):
                return True
    return False


def step_flags(bad: bool, signals: StopSignals) -> tuple[bool, bool, bool]:
    """All ranks agree (all_reduce MAX) on: skip this step, a signal arrived, out of time."""
    signalled, out_of_time = signals.local_flags()
    t = torch.tensor([float(bad), float(signalled), float(out_of_time)], device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] > 0), bool(t[1] > 0), bool(t[2] > 0)

