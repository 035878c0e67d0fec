"""Dry run: validate a config and describe what it would build, without building it.

Pure arithmetic on the typed config: parallel layout, pipeline stages and the reuse groups they hold,
the expert placement map, parameter counts (total, active per token, router overhead) and the per-rank
weights, gradients and optimizer state by megatron's accounting (plan/theory.py). Activations and the
peak per rank are rexmoe-plan's (it runs the real step on fake tensors): one source of truth for
memory. Nothing touches megatron or a process group, so it answers in a second for a 7B config.
"""

from __future__ import annotations

import math
from typing import Optional

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.reuse import pipeline_chunks

PLAN_HINT = "<the same overrides> [--gpu h100-sxm] [--spec te|local]"


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
    vocab = cfg.padded_vocab_size(vocab_size)
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


def _layer_activations(cfg: ExperimentConfig, moe: bool) -> tuple[float, float]:
    """(elements autograd keeps per token of one layer, of which fp32 router elements) on the local
    spec without dropout, tensor by tensor (checked against torch's saved-tensor hooks on a built
    model, tests/tools/test_dry_run.py):

    each norm keeps its input, the normalised input and its output (3h); attention keeps the fused
    QKV output and q/k/v after RoPE, the softmax output (core_attn: heads x seq) and the context;
    an MoE layer keeps the router's logits and scores (fp32) and, per routed copy (top-k), the expert
    input, fc1's output (2F), the SiLU output, the gated product, the gated product times the gate
    (3F, the activation; moe_act drops them) and the expert output; shared experts and dense MLPs
    as one SwiGLU MLP (fc1 2F + 3F activation)."""
    m = cfg.model
    h, heads, d = m.hidden_size, m.num_attention_heads, m.head_dim
    groups = m.num_query_groups or heads
    mods = set(m.recompute_modules or ["core_attn"]) if m.recompute_granularity == "selective" else set()
    attention = 3 * h + 2 * (heads + 2 * groups) * d + heads * d
    if "core_attn" not in mods:
        attention += heads * cfg.train.seq_length
    swiglu = lambda f, act=True: 2 * f + (3 * f if act else 0)  # noqa: E731
    if not moe:
        ffn = m.ffn_hidden_size or 4 * h
        return attention + 3 * h + (0 if "mlp" in mods else h + swiglu(ffn)), 0.0
    if "moe" in mods:  # the MoE layer is replayed from its input (the norm's output)
        return attention + 3 * h, 0.0
    k, f = m.moe_router_topk, m.moe_ffn_hidden_size
    experts = k * (2 * h + swiglu(f, "moe_act" not in mods))
    shared = m.moe_shared_expert_intermediate_size
    if shared and "shared_experts" not in mods:
        experts += h + swiglu(shared)
    router = 2 * cfg.rexmoe.reuse_group_size * m.num_moe_experts
    return attention + 3 * h + experts + router, router


def activation_bytes(cfg: ExperimentConfig, bf16: bool, vocab_size: int) -> dict[str, float]:
    """Activation memory on the first pipeline stage (``saved_gib``: kept from the forward to the
    backward pass; ``activations_gib``: the peak, adding one chunk's replay under full recompute)
    and the share of compute activation recompute adds, for model.recompute_*.

    Full recompute keeps only the input of each recomputed chunk (uniform: every
    recompute_num_layers layers; block: each of the first recompute_num_layers layers of the stage)
    plus, while a chunk is replayed, that chunk's own activations. Tokens are split over tp (sequence
    parallel); the first stage holds pp micro-batches in flight under 1F1B. The LM head's fp32 logits
    are counted on the last stage only (added when pp = 1)."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    elem = 2 if bf16 else 4
    tokens = cfg.train.micro_batch_size * cfg.train.seq_length / tp
    chunks = pipeline_chunks(m.num_layers, pp, p.virtual_pipeline_model_parallel_size,
                             p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage)
    first, count = chunks[0][1], chunks[0][2]
    plan = cfg.reuse_plan()
    per_layer = []
    for layer in range(first, first + count):
        kept, router = _layer_activations(cfg, plan.is_moe_layer(layer + 1))
        per_layer.append((kept - router) * elem + router * 4)
    flops_fraction, replay = 0.0, 0.0
    if m.recompute_granularity == "full":
        n, hidden = m.recompute_num_layers, m.hidden_size * elem
        if m.recompute_method == "uniform":
            chunk_layers = [per_layer[i:i + n] for i in range(0, len(per_layer), n)]
            saved = len(chunk_layers) * hidden
            replay = max(sum(c) for c in chunk_layers)
            replayed = len(per_layer)
        else:
            replayed = min(n, len(per_layer))
            saved = replayed * hidden + sum(per_layer[replayed:])
            replay = max(per_layer[:replayed]) if replayed else 0
        flops_fraction = replayed / len(per_layer) / 3  # one more forward of those layers (fwd+bwd=3)
    else:
        saved = sum(per_layer)
        if m.recompute_granularity == "selective":
            mods = set(m.recompute_modules or ["core_attn"])
            flops_fraction = _selective_flops_fraction(cfg, mods, vocab_size)
    logits = 0.0
    if pp == 1:  # the LM head's fp32 logits (vocab-parallel over tp); on the last stage otherwise
        logits = cfg.train.micro_batch_size * cfg.train.seq_length * 4 * cfg.padded_vocab_size(vocab_size) / tp
    saved_bytes = tokens * saved * pp + logits  # 1F1B: the first stage holds pp micro-batches
    gib = 1024 ** 3
    # peak: everything saved, plus one recomputed chunk's activations while it is replayed
    return {"saved_gib": saved_bytes / gib, "activations_gib": (saved_bytes + tokens * replay) / gib,
            "recompute_extra_compute": round(flops_fraction, 4)}


def _selective_flops_fraction(cfg: ExperimentConfig, mods: set, vocab_size: int) -> float:
    """Share of a training step's FLOPs that selective recompute adds (core/flops.py's counts)."""
    from rexmoe_train.core.flops import flops_per_token, shape_from_experiment

    m, seq = cfg.model, cfg.train.seq_length
    f = flops_per_token(shape_from_experiment(cfg, cfg.padded_vocab_size(vocab_size)),
                        cfg.rexmoe.reuse_group_size, seq)
    extra = 0.0
    if "moe" in mods:  # router + routed and shared experts of every MoE layer
        extra += f["router"] + m.num_moe_layers * 6 * m.hidden_size * (
            m.moe_router_topk * m.moe_ffn_hidden_size + (m.moe_shared_expert_intermediate_size or 0))
    if "core_attn" in mods:  # QK^T and PV (flops.py's causal count)
        extra += m.num_layers * 2 * m.num_attention_heads * m.head_dim * (seq + 1)
    return extra / (3 * (f["counted"] + f["lm_head"]))


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
    stored = m.expert_ffn_stored_size(cfg.train.fp8)
    if stored != m.moe_ffn_hidden_size:  # model/expert_padding.py; the counts below are unpadded
        lines.insert(2, f"expert FFN stored {stored} wide (model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} "
                        f"zero-padded for train.fp8 / model.moe_ffn_pad_multiple; checkpoints hold "
                        f"{m.moe_ffn_hidden_size})")
    for chunk, (stage, first, count) in enumerate(chunks):
        last = first + count - 1
        moe = [layer - m.first_k_dense_layers for layer in range(first, last + 1)
               if plan.is_moe_layer(layer + 1)]
        held = sorted({plan.group_of(i).index for i in moe})
        lines.append(f"  stage {stage} chunk {chunk // pp}: layers {first + 1}-{last + 1}, "
                     f"reuse groups {held}")
    counts = parameter_counts(cfg, vocab_size)
    lines.append("parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    # weights + grads + optimizer: megatron's accounting (plan/theory.py, checked byte for byte against a
    # real step); activations and the peak come only from the planner, which runs the real step
    from rexmoe_train.plan.theory import weights_and_optimizer_bytes

    mem = weights_and_optimizer_bytes(cfg, world, vocab_size=vocab_size, bf16=bf16)
    lines.append("memory per rank (weights+grads+optimizer, largest stage, activations excluded): "
                 + ", ".join(f"{k}={v / 1024 ** 3:.2f} GiB" for k, v in mem["by_category"].items())
                 + f", total={mem['bytes'] / 1024 ** 3:.2f} GiB")
    lines.append(f"memory: for the peak per rank as the training code allocates it, activations included "
                 f"(memory, traffic, time, fits or not), run: rexmoe-plan {PLAN_HINT}")
    group = plan.groups[0]
    placement = ExpertPlacement(group.experts_per_layer, group.size, p.expert_model_parallel_size)
    rows = placement.describe().splitlines()
    lines.append(f"placement of reuse group 0 (same pattern for every group): {rows[0]}")
    shown = rows[1:1 + max_placement_rows]
    lines.extend(shown)
    if len(rows) - 1 > len(shown):
        lines.append(f"  ... {len(rows) - 1 - len(shown)} more candidates")
    return "\n".join(lines)
