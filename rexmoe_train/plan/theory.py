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
