"""FLOP counts for throughput and MFU: one definition for the trainer's metrics and the benchmarks.

Counts only what a token really computes: attention, the k active experts (plus shared experts and
dense MLPs) and the router over its r*N candidates — not the N (or r*N) experts a layer owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets, bf16 and fp8, by device-name match.
PEAK_TFLOPS = [("H100 PCIe", 756.0, 1513.0), ("H100", 989.4, 1978.9), ("H200", 989.4, 1978.9),
               ("B200", 2250.0, 4500.0), ("A100", 312.0, None)]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    experts: int  # N per layer
    topk: int
    moe_ffn: int
    shared_ffn: int = 0  # total shared-expert intermediate size per MoE layer (0: none)
    dense_layers: int = 0  # first-k dense layers
    dense_ffn: int = 0
    vocab: int = 32000
    head_dim: int = 0  # 0: hidden / heads (model.kv_channels may set another)


def flops_per_token(shape: Shape, reuse: int, seq: int) -> dict[str, float]:
    """Forward FLOPs per token by component (multiply-add = 2 FLOPs), summed over layers.

    ``counted`` = attention + active experts (incl. shared/dense MLPs) + router: what MFU uses.
    ``train`` = 3 x counted."""
    h, head_dim = shape.hidden, shape.head_dim or shape.hidden // shape.heads
    moe_layers = shape.layers - shape.dense_layers
    qkv = 2 * h * (shape.heads + 2 * shape.kv_heads) * head_dim
    out = 2 * shape.heads * head_dim * h
    # causal: a token attends to (seq+1)/2 positions on average; QK^T and PV, 2 FLOPs per MAC each
    core = 2 * 2 * shape.heads * head_dim * (seq + 1) / 2
    swiglu = 3 * 2 * h  # per unit of intermediate size: gate and up (h -> f), down (f -> h)
    result = {
        "attention": shape.layers * (qkv + out + core),
        "experts": moe_layers * (shape.topk * shape.moe_ffn + shape.shared_ffn) * swiglu
                   + shape.dense_layers * shape.dense_ffn * swiglu,
        "router": moe_layers * 2 * h * reuse * shape.experts,
        "lm_head": 2 * h * shape.vocab,  # excluded from `counted`
    }
    result["counted"] = result["attention"] + result["experts"] + result["router"]
    result["train"] = 3 * result["counted"]
    return result


def peak_tflops(device_name: str, precision: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    for match, bf16, fp8 in PEAK_TFLOPS:
        if match in device_name:
            return fp8 if precision == "fp8" else bf16
    return None


def shape_from_experiment(cfg, vocab: int) -> Shape:
    """The Shape of an ExperimentConfig's model (``vocab``: the padded embedding size)."""
    m = cfg.model
    return Shape(name="run", hidden=m.hidden_size, heads=m.num_attention_heads,
                 kv_heads=m.num_query_groups or m.num_attention_heads, layers=m.num_layers,
                 experts=m.num_moe_experts, topk=m.moe_router_topk, moe_ffn=m.moe_ffn_hidden_size,
                 shared_ffn=m.moe_shared_expert_intermediate_size or 0, dense_layers=m.first_k_dense_layers,
                 dense_ffn=m.ffn_hidden_size or 4 * m.hidden_size, vocab=vocab, head_dim=m.head_dim)
