"""The ``rexmoe:`` section: what the method adds (reuse groups, gating, PSR, balance losses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rexmoe_train.config.fields import (
    BALANCE_SCOPES,
    EXPERT_BIAS_SCOPES,
    GATE_NORMALIZATIONS,
    GATINGS,
    KERNEL_IMPLS,
    PSR_MASK_DRAW,
    PSR_MASK_ON,
    PSR_SCHEDULES,
    _at_least,
    _fail,
    _one_of,
    _positive,
)


@dataclass
class PSRConfig:
    """Progressive scaling routing: candidates grow from N (t <= start_step) to r*N (t >= end_step)."""

    schedule: str = "linear"  # linear | stepwise | cosine | none (all r*N candidates from step 1)
    start_step: int = 0
    end_step: int = 1
    mask_on: str = "scores"  # scores: zero post-softmax scores (paper); logits: -inf before softmax
    protect_local: bool = False  # keep a layer's own N experts always available
    # per_step: a fresh random mask every optimizer step (the paper); nested: one random order of the
    # candidates per layer for the whole run, the first N_t of it available, so a candidate once
    # opened stays open (docs/ablation_tiny.md section 5: the per-step redraw is what costs)
    mask_draw: str = "per_step"
    seed: Optional[int] = None  # mask seed; defaults to train.seed

    def validate(self, path: str = "rexmoe.psr") -> None:
        _one_of(f"{path}.schedule", self.schedule, PSR_SCHEDULES)
        _one_of(f"{path}.mask_on", self.mask_on, PSR_MASK_ON)
        _one_of(f"{path}.mask_draw", self.mask_draw, PSR_MASK_DRAW)
        _at_least(f"{path}.start_step", self.start_step, 0)
        _at_least(f"{path}.end_step", self.end_step, 0)
        if self.seed is not None:
            _at_least(f"{path}.seed", self.seed, 0)
        if self.schedule != "none" and self.end_step <= self.start_step:
            _fail(f"{path}.end_step", self.end_step, f"must be > {path}.start_step ({self.start_step})")


@dataclass
class BalanceConfig:
    """Load balancing. Coefficient 0 disables a term."""

    layer_aux_coeff: float = 1e-2  # per-layer switch loss over the layer's r*N candidates
    layer_aux_scope: str = "micro_batch"  # micro_batch | global_batch (counts over the step and DP)
    group_aux_coeff: float = 0.0  # group-pooled switch loss over each physical expert's load
    group_aux_scope: str = "micro_batch"
    z_loss_coeff: float = 1e-3  # router z-loss (0 disables)
    # Aux-loss-free balancing (DeepSeek-V3; megatron's names): a per-candidate bias added to the
    # routing scores for the top-k choice only, moved by +-rate after every optimizer step towards
    # the global-batch mean load (model/balance.py update_expert_bias). Scope router: each router's
    # own r*N biases from its own load; physical: one bias per physical expert, shared by the r
    # routers of its group and driven by the load it gets from all of them.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    expert_bias_scope: str = "router"

    def validate(self, path: str = "rexmoe.balance") -> None:
        for name in ("layer_aux_coeff", "group_aux_coeff", "z_loss_coeff"):
            _at_least(f"{path}.{name}", getattr(self, name), 0.0)
        _one_of(f"{path}.layer_aux_scope", self.layer_aux_scope, BALANCE_SCOPES)
        _one_of(f"{path}.group_aux_scope", self.group_aux_scope, BALANCE_SCOPES)
        _one_of(f"{path}.moe_router_enable_expert_bias", self.moe_router_enable_expert_bias, (True, False))
        _positive(f"{path}.moe_router_bias_update_rate", self.moe_router_bias_update_rate)
        _one_of(f"{path}.expert_bias_scope", self.expert_bias_scope, EXPERT_BIAS_SCOPES)


@dataclass
class ReXMoEConfig:
    reuse_group_size: int = 1  # r; 1 is vanilla MoE
    allow_partial_last_group: bool = False
    gating: str = "softmax_then_topk"
    # What the kept (top-k) gate values are scaled by. none: as the gating gives them (the paper).
    # renorm_topk: divided by their sum, so each token's gates sum to 1 (what topk_then_softmax and
    # sigmoid with k > 1 already do). scale_candidates: multiplied by N_t / N (candidates available
    # now over a layer's own N): a softmax over r*N candidates makes every kept gate about r times
    # smaller than vanilla's softmax over N; this restores the vanilla scale and keeps the ratios.
    gate_normalization: str = "none"
    psr: PSRConfig = field(default_factory=PSRConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    # Triton kernels (kernels/): the fused router (softmax_then_topk gating with the PSR
    # mask on scores) and the rexmoe_dedup dispatcher's permute/unpermute. auto: Triton on a GPU when
    # triton is importable, torch elsewhere; triton forces them (on CPU only under TRITON_INTERPRET=1).
    kernels: str = "auto"

    def validate(self, path: str = "rexmoe") -> None:
        _at_least(f"{path}.reuse_group_size", self.reuse_group_size, 1)
        _one_of(f"{path}.gating", self.gating, GATINGS)
        _one_of(f"{path}.gate_normalization", self.gate_normalization, GATE_NORMALIZATIONS)
        _one_of(f"{path}.kernels", self.kernels, KERNEL_IMPLS)
        if self.kernels == "triton":
            if self.gating != "softmax_then_topk" or self.psr.mask_on != "scores":
                _fail(f"{path}.kernels", self.kernels,
                      f"the fused router implements {path}.gating=softmax_then_topk with "
                      f"{path}.psr.mask_on=scores only; use auto (torch gating for other settings)")
            if self.balance.moe_router_enable_expert_bias:
                _fail(f"{path}.kernels", self.kernels,
                      f"the fused router has no selection bias ({path}.balance.moe_router_enable_expert_bias"
                      "=true); use auto (torch gating for other settings)")
        self.psr.validate(f"{path}.psr")
        self.balance.validate(f"{path}.balance")
