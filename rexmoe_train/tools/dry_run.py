"""Dry run: validate a config and describe what it would build, without building it.

Pure arithmetic on the typed config: parallel layout, pipeline stages and the reuse groups they hold,
the expert placement map, parameter counts (total, active per token, router overhead) and a per-rank
memory estimate for weights, gradients and Adam state. Nothing touches megatron or a process group,
so it answers in a second for a 7B config on a laptop.
"""

from __future__ import annotations

import math
from typing import Optional

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.reuse import pipeline_chunks


def padded_vocab(cfg: ExperimentConfig, vocab_size: int) -> int:
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def parameter_counts(cfg: ExperimentConfig, vocab_size: int) -> dict[str, int]:
    """Counts for the local-spec model this project builds (SwiGLU MLPs, RMSNorm, no biases)."""
    m, plan = cfg.model, cfg.reuse_plan()
    h, heads = m.hidden_size, m.num_attention_heads
    head_dim = m.head_dim  # model.kv_channels, else hidden / heads
    groups = m.num_query_groups or heads
    attention = h * (heads + 2 * groups) * head_dim + heads * head_dim * h
    if m.qk_layernorm:  # one per-head norm for queries, one for keys (shared across heads)
        attention += 2 * head_dim
    norms = 2 * h
    swiglu = lambda inner: 3 * h * inner  # noqa: E731 - fc1 (gate + up) and fc2
    dense_mlp = swiglu(m.ffn_hidden_size or 4 * h)
    expert = swiglu(m.moe_ffn_hidden_size)
    shared = swiglu(m.moe_shared_expert_intermediate_size) if m.moe_shared_expert_intermediate_size else 0
    vocab = padded_vocab(cfg, vocab_size)
    embeddings = vocab * h * (2 if m.untie_embeddings_and_output_weights else 1)
    routers = sum(g.num_candidates * h * g.size for g in plan.groups)
    experts = plan.num_moe_layers * m.num_moe_experts * expert
    dense_layers = m.first_k_dense_layers * (attention + norms + dense_mlp)
    moe_layers = plan.num_moe_layers * (attention + norms + shared)
    total = embeddings + h + dense_layers + moe_layers + routers + experts
    active = total - experts + plan.num_moe_layers * m.moe_router_topk * expert
    vanilla_routers = plan.num_moe_layers * m.num_moe_experts * h
    return {
        "total": total,
        "experts": experts,
        "routers": routers,
        "router_overhead_vs_vanilla": routers - vanilla_routers,
        "active_per_token": active,
        "embeddings": embeddings,
    }


def memory_per_rank_bytes(cfg: ExperimentConfig, counts: dict[str, int], world_size: int,
                          bf16: bool) -> dict[str, float]:
    """Weights + grads + Adam (fp32 master, m, v) per rank, activations excluded."""
    p = cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size
    dp = world_size // (tp * pp)
    expert_dp = world_size // (etp * ep * pp)
    dense = (counts["total"] - counts["experts"]) / (tp * pp)
    experts = counts["experts"] / (ep * etp * pp)
    weight_bytes = 2 if bf16 else 4
    # grads are reduced in fp32 (grad_reduce_in_fp32); Adam keeps fp32 master (bf16 only), m and v
    state_bytes = (4 + 4) + (4 + 4 + (4 if bf16 else 0))
    if p.use_distributed_optimizer:
        optimizer = (dense / dp + experts / expert_dp) * (state_bytes - 4)
        grads = (dense + experts) * 4
    else:
        optimizer = (dense + experts) * (state_bytes - 4)
        grads = (dense + experts) * 4
    weights = (dense + experts) * weight_bytes
    gib = 1024 ** 3
    return {"weights_gib": weights / gib, "grads_gib": grads / gib, "optimizer_gib": optimizer / gib,
            "total_gib": (weights + grads + optimizer) / gib}


def minimal_world_size(cfg: ExperimentConfig) -> int:
    p = cfg.parallel
    a = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    b = p.expert_tensor_parallel_size * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    return a * b // math.gcd(a, b)


def describe(cfg: ExperimentConfig, vocab_size: int, world_size: Optional[int] = None,
             bf16: bool = True, max_placement_rows: int = 16) -> str:
    world = world_size or minimal_world_size(cfg)
    cfg.validate(world)
    p, m, plan = cfg.parallel, cfg.model, cfg.reuse_plan()
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    chunks = pipeline_chunks(m.num_layers, pp, p.virtual_pipeline_model_parallel_size,
                             p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage)
    lines = [
        f"world size {world}: tp={tp} pp={pp} vpp={p.virtual_pipeline_model_parallel_size} "
        f"ep={p.expert_model_parallel_size} etp={p.expert_tensor_parallel_size} "
        f"dp={world // (tp * pp)} dispatcher={p.moe_token_dispatcher_type} "
        f"distributed_optimizer={p.use_distributed_optimizer}",
        f"model: {m.num_layers} layers ({m.first_k_dense_layers} dense first), hidden {m.hidden_size}, "
        f"top-{m.moe_router_topk} of {m.num_moe_experts} experts/layer, reuse r={cfg.rexmoe.reuse_group_size} "
        f"-> {len(plan.groups)} reuse groups, PSR {cfg.rexmoe.psr.schedule} "
        f"{cfg.rexmoe.psr.start_step}->{cfg.rexmoe.psr.end_step}",
        "pipeline:",
    ]
    for chunk, (stage, first, count) in enumerate(chunks):
        last = first + count - 1
        moe = [layer - m.first_k_dense_layers for layer in range(first, last + 1)
               if plan.is_moe_layer(layer + 1)]
        held = sorted({plan.group_of(i).index for i in moe})
        lines.append(f"  stage {stage} chunk {chunk // pp}: layers {first + 1}-{last + 1}, "
                     f"reuse groups {held}")
    counts = parameter_counts(cfg, vocab_size)
    lines.append("parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    mem = memory_per_rank_bytes(cfg, counts, world, bf16)
    lines.append("memory per rank (weights+grads+Adam, activations excluded): "
                 + ", ".join(f"{k}={v:.2f}" for k, v in mem.items()))
    group = plan.groups[0]
    placement = ExpertPlacement(group.experts_per_layer, group.size, p.expert_model_parallel_size)
    rows = placement.describe().splitlines()
    lines.append(f"placement of reuse group 0 (same pattern for every group): {rows[0]}")
    shown = rows[1:1 + max_placement_rows]
    lines.extend(shown)
    if len(rows) - 1 > len(shown):
        lines.append(f"  ... {len(rows) - 1 - len(shown)} more candidates")
    return "\n".join(lines)
