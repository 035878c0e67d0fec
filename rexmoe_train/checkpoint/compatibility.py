"""Whether a checkpoint fits the run that wants to load it: the model's shape, the parallel layout
its optimizer state follows, and the sharding metadata both sides must use. Torch-free arithmetic on
the config and the manifest; every mismatch is one CheckpointError line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.checkpoint.layout import META, read_metadata


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
    p, m = cfg.parallel, cfg.model
    stored = m.expert_ffn_stored_size(cfg.train.fp8)
    # The expert bank's stored FFN width, only when padded (model/expert_padding.py): model weights
    # are saved unpadded, but the distributed optimizer's buffers hold the pads. Absent otherwise, so
    # the signature of an unpadded run is what it always was.
    padded = {"expert_ffn_padded_to": stored} if stored != m.moe_ffn_hidden_size else {}
    return {
        "world_size": world_size,
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
        "data_parallel_size": cfg.data_parallel_size(world_size),
        "use_distributed_optimizer": p.use_distributed_optimizer,
        **padded,
    }


def _optimizer_layout(par: dict) -> tuple:
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
            "expert_tensor_parallel_size")
    return (*(par[k] for k in keys), par.get("expert_ffn_padded_to"))  # absent: not padded


def _describe_layout(par: dict) -> str:
    kind = "distributed" if par["use_distributed_optimizer"] else "non-distributed"
    return (f"{kind} optimizer, tp={par['tensor_model_parallel_size']} "
            f"pp={par['pipeline_model_parallel_size']} vpp={par['virtual_pipeline_model_parallel_size']} "
            f"ep={par['expert_model_parallel_size']} etp={par['expert_tensor_parallel_size']}"
            + (f" expert FFN padded to {par['expert_ffn_padded_to']}" if par.get("expert_ffn_padded_to") else ""))


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
    check_data_position(cfg, ckpt, meta)
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


def check_data_position(cfg, ckpt: Path, meta: dict) -> None:
    """The next step must start at the sample after the checkpoint's: the batch of step t is a pure
    function of (seed, t, global batch), so the global batch must be the checkpoint's. The
    data-parallel size may change (elastic restarts): it only decides which rank reads which sample."""
    saved = meta.get("consumed_samples")
    if saved is None:
        return
    here = meta["step"] * cfg.train.global_batch_size
    if saved != here:
        gbs = saved // meta["step"]
        raise CheckpointError(
            f"checkpoint error: {ckpt}: saved after sample {saved} (step {meta['step']} x global batch {gbs}), "
            f"train.global_batch_size={cfg.train.global_batch_size} would resume after sample {here}; "
            f"resume with train.global_batch_size={gbs} (the data-parallel size may change, the global batch "
            "may not)")


def data_parallel_change(cfg, meta: dict, world_size: int) -> Optional[str]:
    """One log line when a resume changes the data-parallel size (e.g. an elastic restart on fewer
    nodes): the global batch stays, the micro-batches per rank and step follow (global batch /
    (micro batch x DP)), and the data stream continues at the checkpoint's sample."""
    saved = meta.get("parallel", {}).get("data_parallel_size")
    now = cfg.data_parallel_size(world_size)
    if saved is None or saved == now:
        return None
    t = cfg.train
    old_micro = t.global_batch_size // (t.micro_batch_size * saved) if t.global_batch_size % (
        t.micro_batch_size * saved) == 0 else "?"
    new_micro = t.global_batch_size // (t.micro_batch_size * now)
    kind = "distributed optimizer state resharded over DP" if cfg.parallel.use_distributed_optimizer \
        else "optimizer state per parameter"
    return (f"data-parallel size {saved} -> {now} (world {meta['parallel'].get('world_size')} -> {world_size}): "
            f"global batch {t.global_batch_size} unchanged, {old_micro} -> {new_micro} micro-batches per rank "
            f"and step, continuing after sample {meta['step'] * t.global_batch_size}; {kind}")
