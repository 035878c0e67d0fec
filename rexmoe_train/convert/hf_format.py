"""ReXMoE <-> Hugging Face Qwen2-MoE / Qwen3-MoE tensor mapping.

Target architecture: transformers' stock ``Qwen2MoeForCausalLM`` (model_type ``qwen2_moe``), or
``Qwen3MoeForCausalLM`` (``qwen3_moe``) when the model has ``model.qk_layernorm`` (Qwen3 always
applies a per-head RMSNorm to queries and keys, Qwen2 never does). Both have what we need: softmax
router with top-k and ``norm_topk_prob`` (False = the paper's softmax-then-top-k; True =
top-k-then-softmax, which is the same function, and also the paper's gating with the kept gates
renormalised, ``rexmoe.gate_normalization=renorm_topk``), SwiGLU experts, RMSNorm, RoPE, GQA, no attention
bias, dense layers through ``mlp_only_layers``; Qwen2-MoE also has a shared expert (Qwen3-MoE has
none, so shared experts with QK-norm are refused).

Two details make the export exact rather than approximate:
- Reuse is unrolled: layer l gets its group's r*N candidates as r*N experts (copies of the owners'
  weights, in candidate order) and its own router [r*N, hidden]. PSR is fully open.
- Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate(x)). With the gate weight zero
  that is exactly 0.5, so the shared expert's down projection is stored doubled (exact in binary
  floating point). Without shared experts the shared expert has intermediate size 0 (it outputs 0).
Sigmoid gating and ``gate_normalization=scale_candidates`` (kept gates times r at full PSR) have no
Qwen equivalent: export refuses them rather than export something different.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rexmoe_train.config.schema import ExperimentConfig


class ConvertError(ValueError):
    """A conversion input is invalid or not representable. One line, names what differs."""


def check_exportable(cfg: ExperimentConfig) -> None:
    if cfg.rexmoe.gating == "sigmoid":
        raise ConvertError("export-hf: rexmoe.gating=sigmoid has no Qwen2-MoE equivalent (its router is "
                           "softmax); supported gatings: softmax_then_topk, topk_then_softmax")
    if cfg.rexmoe.gate_normalization == "scale_candidates":
        raise ConvertError("export-hf: rexmoe.gate_normalization=scale_candidates has no Qwen2-MoE equivalent "
                           "(its gates are a softmax, optionally renormalised); supported: none, renorm_topk")
    if cfg.model.normalization != "RMSNorm":
        raise ConvertError(f"export-hf: model.normalization={cfg.model.normalization} is not representable "
                           "in Qwen2-MoE (RMSNorm only)")
    if cfg.model.qk_layernorm and cfg.model.moe_shared_expert_intermediate_size:
        raise ConvertError("export-hf: model.qk_layernorm=true needs Qwen3-MoE, which has no shared expert "
                           f"(model.moe_shared_expert_intermediate_size="
                           f"{cfg.model.moe_shared_expert_intermediate_size}); Qwen2-MoE has no QK-norm")


def norm_topk_prob(cfg: ExperimentConfig) -> bool:
    """Whether each token's kept gates sum to 1: Qwen's softmax over all experts, top-k, then renormalised
    over the k equals topk_then_softmax, and the paper's softmax_then_topk with renorm_topk."""
    return cfg.rexmoe.gating == "topk_then_softmax" or cfg.rexmoe.gate_normalization == "renorm_topk"


def hf_architecture(cfg: ExperimentConfig) -> str:
    """The stock transformers class an export of ``cfg`` loads as."""
    return "Qwen3MoeForCausalLM" if cfg.model.qk_layernorm else "Qwen2MoeForCausalLM"


def hf_config(cfg: ExperimentConfig, vocab_size: int) -> dict:
    """config.json of the unrolled Qwen2-MoE (Qwen3-MoE with QK-norm) model. ``vocab_size`` is the
    padded embedding size."""
    m, plan = cfg.model, cfg.reuse_plan()
    sizes = {g.num_candidates for g in plan.groups}
    if len(sizes) != 1:
        raise ConvertError("export-hf: a partial last reuse group gives layers different expert counts, "
                           "which Qwen2-MoE cannot express (allow_partial_last_group=true)")
    config = {
        "architectures": [hf_architecture(cfg)],
        "model_type": "qwen3_moe" if m.qk_layernorm else "qwen2_moe",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings or cfg.train.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "rope_theta": float(m.rotary_base),  # the key transformers 4.x reads
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(m.first_k_dense_layers)),
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "num_experts_per_tok": m.moe_router_topk,
        "num_experts": sizes.pop(),
        "norm_topk_prob": norm_topk_prob(cfg),
        "use_sliding_window": False,
        "torch_dtype": "bfloat16" if cfg.train.bf16 else "float32",
        "use_cache": True,
    }
    if m.qk_layernorm:
        config["attention_bias"] = False
    else:
        config["shared_expert_intermediate_size"] = m.moe_shared_expert_intermediate_size or 0
        config["qkv_bias"] = False
    return config


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """megatron's fused QKV rows are grouped per KV group: [q of the group's heads, k, v]."""
    per_group = heads // groups
    w = qkv.view(groups, (per_group + 2) * head_dim, -1)
    q = w[:, : per_group * head_dim].reshape(heads * head_dim, -1)
    k = w[:, per_group * head_dim: (per_group + 1) * head_dim].reshape(groups * head_dim, -1)
    v = w[:, (per_group + 1) * head_dim:].reshape(groups * head_dim, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
              head_dim: int) -> torch.Tensor:
    per_group = heads // groups
    hidden = q.shape[-1]
    return torch.cat([q.view(groups, per_group * head_dim, hidden), k.view(groups, head_dim, hidden),
                      v.view(groups, head_dim, hidden)], dim=1).reshape(-1, hidden)


def _swiglu_out(prefix: str, fc1: torch.Tensor, fc2: torch.Tensor, down_scale: float = 1.0):
    gate, up = fc1.chunk(2, dim=0)  # megatron GLU: silu(first half) * second half
    yield f"{prefix}.gate_proj.weight", gate
    yield f"{prefix}.up_proj.weight", up
    yield f"{prefix}.down_proj.weight", fc2 * down_scale if down_scale != 1.0 else fc2


def hf_layer_tensors(cfg: ExperimentConfig, state: dict, layer: int, bank_experts: list) -> Iterator:
    """Tensors of HF decoder layer ``layer`` (0-based) from our (1-process) state dict.

    ``bank_experts``: the layer's group's experts in candidate order, each a (fc1, fc2) pair.
    """
    m = cfg.model
    src, dst = f"decoder.layers.{layer}", f"model.layers.{layer}"
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    q, k, v = split_qkv(state[f"{src}.self_attention.linear_qkv.weight"], heads, groups,
                        m.head_dim)
    yield f"{dst}.input_layernorm.weight", state[f"{src}.input_layernorm.weight"]
    yield f"{dst}.self_attn.q_proj.weight", q
    yield f"{dst}.self_attn.k_proj.weight", k
    yield f"{dst}.self_attn.v_proj.weight", v
    yield f"{dst}.self_attn.o_proj.weight", state[f"{src}.self_attention.linear_proj.weight"]
    if m.qk_layernorm:
        yield f"{dst}.self_attn.q_norm.weight", state[f"{src}.self_attention.q_layernorm.weight"]
        yield f"{dst}.self_attn.k_norm.weight", state[f"{src}.self_attention.k_layernorm.weight"]
    yield f"{dst}.post_attention_layernorm.weight", state[f"{src}.pre_mlp_layernorm.weight"]
    if layer < m.first_k_dense_layers:
        yield from _swiglu_out(f"{dst}.mlp", state[f"{src}.mlp.linear_fc1.weight"],
                               state[f"{src}.mlp.linear_fc2.weight"])
        return
    yield f"{dst}.mlp.gate.weight", state[f"{src}.mlp.router.weight"]
    for c, (fc1, fc2) in enumerate(bank_experts):
        yield from _swiglu_out(f"{dst}.mlp.experts.{c}", fc1, fc2)
    hidden = m.hidden_size
    if m.qk_layernorm:  # Qwen3-MoE: no shared expert (check_exportable refused one)
        return
    if m.moe_shared_expert_intermediate_size:
        yield from _swiglu_out(f"{dst}.mlp.shared_expert", state[f"{src}.mlp.shared_experts.linear_fc1.weight"],
                               state[f"{src}.mlp.shared_experts.linear_fc2.weight"], down_scale=2.0)
    else:
        empty = state[f"{src}.mlp.router.weight"].new_zeros
        yield f"{dst}.mlp.shared_expert.gate_proj.weight", empty(0, hidden)
        yield f"{dst}.mlp.shared_expert.up_proj.weight", empty(0, hidden)
        yield f"{dst}.mlp.shared_expert.down_proj.weight", empty(hidden, 0)
    yield f"{dst}.mlp.shared_expert_gate.weight", state[f"{src}.mlp.router.weight"].new_zeros(1, hidden)


def hf_outer_tensors(cfg: ExperimentConfig, state: dict) -> Iterator:
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if cfg.model.untie_embeddings_and_output_weights:
        yield "lm_head.weight", state["output_layer.weight"]
