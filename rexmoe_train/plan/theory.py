"""Weights + gradients + optimizer state per rank, by the accounting of Megatron-LM's theoretical memory
report (megatron/training/theoretical_memory_usage.py, compute_weight_and_optimizer_memory), re-derived
for this project's models: the cross-check for the planner's measured parameter/grad/optimizer bytes.

The accounting: parameters fall in three classes by how a rank holds them,
  * tensor-parallel sharded: attention projections, dense and shared-expert MLPs, word embeddings and
    the output layer (/ tp);
  * replicated: norms and routers (every tp rank holds all of them);
  * expert sharded: the routed experts (/ (etp * ep));
and each pipeline stage holds its own layers (the embedding on the first, the final norm and the output
layer on the last). Bytes per parameter with bf16 training: 2 (bf16 weight) + 4 (fp32 main gradient)
+ 12 (fp32 master weight, Adam m and v) = 18; the distributed optimizer shards the 12 over the data-
parallel ranks of the parameter's class (dp for dense, expert-dp for experts): 6 + 12 / dp.

Where this departs from megatron's literal formula, and why: a ReXMoE router scores r*N candidates
(r*N*h weights, megatron counts N*h: equal for r=1); the per-head q/k norms of qk_layernorm (2*head_dim
per layer) are counted as replicated; the stage split is megatron's real one (core/reuse.py
pipeline_chunks: uneven first/last stages too) instead of num_layers / pp, and the maximum over stages
is reported (megatron reports the first stage); fp32 training (the CPU path) keeps no master copy
(the fp32 weight is its own master, megatron's DistributedOptimizer shards views of it): 4 + 4 + 8.
"""

from __future__ import annotations

from typing import Optional

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.core.reuse import pipeline_chunks


def parameter_classes(cfg: ExperimentConfig, vocab_size: int) -> list[dict[str, int]]:
    """Unsharded parameter counts by class for each pipeline stage:
    [{"tp_sharded", "replicated", "expert_sharded"}, ...] (all model chunks of a stage summed)."""
    m, p = cfg.model, cfg.parallel
    h, heads, d = m.hidden_size, m.num_attention_heads, m.head_dim
    groups = m.num_query_groups or heads
    attention = h * (heads + 2 * groups) * d + heads * d * h  # QKV and output projections, no biases
    norms = 2 * h + (2 * d if m.qk_layernorm else 0)  # RMSNorm: one weight vector each
    dense_mlp = 3 * h * (m.ffn_hidden_size or 4 * h)  # SwiGLU: gate + up, then down
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0)
    expert = 3 * h * m.expert_ffn_stored_size(cfg.train.fp8)
    embedding = cfg.padded_vocab_size(vocab_size) * h
    plan = cfg.reuse_plan()
    pp = p.pipeline_model_parallel_size
    stages = [{"tp_sharded": 0, "replicated": 0, "expert_sharded": 0} for _ in range(pp)]
    for stage, first, count in pipeline_chunks(m.num_layers, pp, p.virtual_pipeline_model_parallel_size,
                                               p.num_layers_in_first_pipeline_stage,
                                               p.num_layers_in_last_pipeline_stage):
        row = stages[stage]
        for layer in range(first, first + count):
            row["replicated"] += norms
            if plan.is_moe_layer(layer + 1):
                group = plan.group_of(plan.moe_index(layer + 1))
                row["tp_sharded"] += attention + shared
                row["replicated"] += group.num_candidates * h  # the router over r*N candidates
                row["expert_sharded"] += m.num_moe_experts * expert  # experts stored once, by owner
            else:
                row["tp_sharded"] += attention + dense_mlp
    stages[0]["tp_sharded"] += embedding
    stages[-1]["replicated"] += h  # final norm
    if m.untie_embeddings_and_output_weights:
        stages[-1]["tp_sharded"] += embedding
    elif pp > 1:  # tied: the last stage keeps its own copy of the word embeddings for the output layer
        stages[-1]["tp_sharded"] += embedding
    return stages


def bytes_per_parameter(bf16: bool, distributed_optimizer: bool, data_parallel_size: int) -> float:
    """Weight + main gradient + optimizer state bytes one parameter costs a rank."""
    weight, grad, state = (2, 4, 12) if bf16 else (4, 4, 8)
    if distributed_optimizer:
        return weight + grad + state / data_parallel_size
    return weight + grad + state


def weights_and_optimizer_bytes(experiment_config: ExperimentConfig, world_size: int,
                                vocab_size: Optional[int] = None, bf16: Optional[bool] = None) -> dict:
    """Per-rank weights + gradients + optimizer bytes (megatron's accounting, module docstring).

    ``vocab_size``: the tokenizer's (default model.vocab_size). ``bf16``: default train.bf16, and bf16
    when that is null (the GPU default: this estimates GPU runs). Returns the largest stage's
    ``bytes`` and its ``params`` (held by one rank), every stage's, and the split by category."""
    cfg = experiment_config
    cfg.validate_layout(world_size)
    vocab = vocab_size or cfg.model.vocab_size
    if vocab is None:
        raise ValueError("vocab_size is needed when model.vocab_size is null (the tokenizer decides it)")
    if bf16 is None:
        bf16 = cfg.train.bf16 if cfg.train.bf16 is not None else True
    p = cfg.parallel
    tp, etp, ep, pp = (p.tensor_model_parallel_size, p.expert_tensor_parallel_size,
                       p.expert_model_parallel_size, p.pipeline_model_parallel_size)
    dp = world_size // (tp * pp)
    edp = world_size // (etp * ep * pp)
    dist = p.use_distributed_optimizer
    weight, grad, state = (2, 4, 12) if bf16 else (4, 4, 8)
    stages = []
    for counts in parameter_classes(cfg, vocab):
        dense = counts["tp_sharded"] / tp + counts["replicated"]
        experts = counts["expert_sharded"] / (etp * ep)
        optimizer = state * (dense / dp + experts / edp if dist else dense + experts)
        by_category = {"parameters": weight * (dense + experts), "gradients": grad * (dense + experts),
                       "optimizer": optimizer}
        total = (dense * bytes_per_parameter(bf16, dist, dp)
                 + experts * bytes_per_parameter(bf16, dist, edp))
        stages.append({"params": dense + experts, "dense_params": dense, "expert_params": experts,
                       "bytes": total, "by_category": by_category})
    largest = max(range(len(stages)), key=lambda s: stages[s]["bytes"])
    return {"bytes": stages[largest]["bytes"], "params": stages[largest]["params"], "stage": largest,
            "by_category": stages[largest]["by_category"], "stages": stages,
            "bytes_per_param": {"dense": bytes_per_parameter(bf16, dist, dp),
                                "expert": bytes_per_parameter(bf16, dist, edp)},
            "bf16": bf16, "dp": dp, "edp": edp}


# -------------------------------------------------------------------------------------------------
# A start-up check for GPUs without Transformer Engine. There megatron's local DotProductAttention runs
# (--spec local in the planner) and keeps the [micro-batch, heads, seq, seq] softmax output of every
# layer for backward, which alone takes most of the packaged paper recipes past 80 GB (docs/planning.md,
# local rows). The planner measures it in minutes; this lower bound costs nothing at start-up.
def kept_attention_score_layers(cfg: ExperimentConfig, stage_layers: int) -> int:
    """Layers of one stage whose attention scores stay alive until backward (at least one: full
    recompute still holds the layer being recomputed)."""
    m = cfg.model
    if m.recompute_granularity == "full":
        if m.recompute_method == "block":
            return max(1, stage_layers - min(stage_layers, m.recompute_num_layers or 0))
        return 1
    if m.recompute_granularity == "selective" and (m.recompute_modules is None or "core_attn" in m.recompute_modules):
        return 1  # megatron's selective default recomputes core attention
    return stage_layers


def local_attention_lower_bound(cfg: ExperimentConfig, world_size: int) -> dict:
    """A lower bound on one rank's memory under the local layer spec: weights + gradients + optimizer
    state (megatron's accounting above; 0 when model.vocab_size is left to the tokenizer) plus one
    micro-batch's kept attention scores on the largest stage. Per score element and kept layer: bf16
    training keeps the fp32 softmax output (megatron's attention_softmax_in_fp32, on by default) for
    the softmax backward and its bf16 cast for the probs @ V backward, 4 + 2 bytes; fp32 training
    keeps the one fp32 tensor, 4 bytes. The planner's measured local rows agree (rexmoe_2.3b: 188 GiB
    of extra activations over the TE spec for 192 GiB counted here); the MLPs' activations,
    temporaries and the dropout mask (attention_dropout is 0) are left out."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    bf16 = t.bf16 if t.bf16 is not None else True
    stage_layers = max(count for _, _, count in pipeline_chunks(
        m.num_layers, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
        p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage))
    heads = m.num_attention_heads // p.tensor_model_parallel_size
    per_layer = t.micro_batch_size * heads * t.seq_length * t.seq_length * (4 + 2 if bf16 else 4)
    scores = kept_attention_score_layers(cfg, stage_layers) * per_layer
    weights = (weights_and_optimizer_bytes(cfg, world_size, bf16=bf16)["bytes"]
               if m.vocab_size is not None else 0)
    return {"scores_bytes": scores, "weights_bytes": weights, "bytes": scores + weights}


def local_attention_warning(cfg: ExperimentConfig, world_size: int, device_bytes: int,
                            overrides: str = "<your overrides>") -> Optional[str]:
    """One line when the lower bound alone exceeds what the device's memory leaves a job's tensors
    (the planner's usable memory: capacity less the CUDA context, less the allocator's slack), else
    None."""
    from rexmoe_train.plan.hardware import usable_of_capacity

    bound = local_attention_lower_bound(cfg, world_size)
    usable = usable_of_capacity(device_bytes)
    if bound["bytes"] <= usable:
        return None
    gib = 1024 ** 3
    return (f"[memory] warning: no Transformer Engine here, so megatron's local attention keeps every layer's "
            f"[micro-batch, heads, seq, seq] scores for backward: at least {bound['scores_bytes'] / gib:.1f} GiB "
            f"of them plus {bound['weights_bytes'] / gib:.1f} GiB of weights, gradients and optimizer state "
            f"per rank, over the {usable / gib:.1f} GiB a job can use of this GPU's {device_bytes / gib:.1f} GiB, "
            f"so the first step will run out of "
            f"memory; `rexmoe-plan {overrides} --spec local` finds the smallest change that fits "
            f"(docs/planning.md), or install Transformer Engine (docker/)")
