"""Small builders shared by tests (configs sized for a 2-core CPU)."""

from __future__ import annotations

from rexmoe_train.config.schema import ExperimentConfig


def tiny_config(r: int = 4, layers: int = 4, experts: int = 8, topk: int = 2, hidden: int = 64,
                gating: str = "softmax_then_topk", psr: str = "none", **psr_kw) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = layers, hidden, 4, 2
    m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size = experts, topk, 64
    cfg.rexmoe.reuse_group_size = r
    cfg.rexmoe.gating = gating
    cfg.rexmoe.psr.schedule = psr
    cfg.rexmoe.psr.start_step = psr_kw.pop("start_step", 0)
    cfg.rexmoe.psr.end_step = psr_kw.pop("end_step", 10)
    for key, value in psr_kw.items():
        setattr(cfg.rexmoe.psr, key, value)
    cfg.train.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = 32, 2, 4
    cfg.train.train_iters, cfg.train.lr_warmup_iters = 10, 1
    return cfg
