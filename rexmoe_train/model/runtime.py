"""ReuseGroupRuntime: what the r MoE layers of one reuse group share, built once per model chunk.

``build_model`` builds one runtime per group of the chunk — the group's expert placement, its layer
config (megatron's MoE config with ``num_moe_experts = r*N``), its expert bank, its group-pooled
balance state and the token-dispatcher class — and hands it to the group's layers. Layer
construction then has no side effects: it builds its own router and dispatcher, and refers to the
bank it is given.

Why the banks are built here, before the layers: each bank is one module registered once on the
model (``GPTModel.expert_banks``). Expert weights are initialised under megatron's expert-parallel
RNG tracker, a stream of its own, so building them before the layers draws the same values as
building each one inside its group's first layer did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from rexmoe_train.config.schema import ExperimentConfig, ReXMoEConfig
from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.psr import PSRState
from rexmoe_train.core.reuse import ReuseGroup, ReusePlan
from rexmoe_train.model import expert_padding
from rexmoe_train.model.balance import GroupBalance, ScopedCounts
from rexmoe_train.model.experts import bank_class
from rexmoe_train.parallel.dispatcher import DEDUP_DISPATCHER, DedupAllToAllDispatcher


@dataclass
class ReuseGroupRuntime:
    group: ReuseGroup
    plan: ReusePlan
    rexmoe: ReXMoEConfig
    placement: ExpertPlacement
    layer_config: object  # TransformerConfig of every MoE layer of the group
    bank: object  # ExpertBank / TEExpertBank over the group's local slots
    balance: GroupBalance
    psr_state: PSRState
    # None: megatron's own dispatcher (layer_config.moe_token_dispatcher_type); else our class.
    dispatcher_class: Optional[type] = None


def group_layer_config(tc, group: ReuseGroup, dispatcher_type: str, rexmoe: ReXMoEConfig):
    """The layer config of a group's MoE layers: a shallow copy with r*N experts. To megatron's
    dispatcher a reuse group is an MoE layer with r times the experts."""
    layer_config = copy.copy(tc)
    layer_config.num_moe_experts = group.num_candidates
    # Balance losses are the router's own (balance.py); megatron's would double count.
    layer_config.moe_router_load_balancing_type = "none"
    layer_config.moe_aux_loss_coeff = 0.0
    # Aux-loss-free balancing: megatron's TopKRouter then builds its persistent fp32 expert_bias
    # buffer (checkpointed with the router); the update is ours (balance.update_expert_bias). The
    # copied config skips megatron's "sigmoid only" check: gate() biases all three gatings.
    layer_config.moe_router_enable_expert_bias = rexmoe.balance.moe_router_enable_expert_bias
    layer_config.moe_router_bias_update_rate = rexmoe.balance.moe_router_bias_update_rate
    # megatron's MoELayer knows only its own dispatcher names: ours is built by the layer after
    # megatron's alltoall one (cheap: it holds no buffers until the first forward).
    if dispatcher_type == DEDUP_DISPATCHER:
        layer_config.moe_token_dispatcher_type = "alltoall"
    return layer_config


def build_group_runtimes(cfg: ExperimentConfig, tc, plan: ReusePlan, psr_state: PSRState, experts_spec,
                         groups: list[ReuseGroup]) -> dict[int, ReuseGroupRuntime]:
    """One runtime per group in ``groups`` (the groups of one model chunk). parallel_state must be
    initialised; ``experts_spec`` is the experts ModuleSpec of the MoE layer spec."""
    pg_collection = get_default_pg_collection()
    ep = pg_collection.ep.size()
    balance_cfg = cfg.rexmoe.balance
    tp_dp_cp = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    dispatcher_type = cfg.parallel.moe_token_dispatcher_type
    runtimes = {}
    for group in groups:
        placement = ExpertPlacement(group.experts_per_layer, group.size, ep)
        layer_config = group_layer_config(tc, group, dispatcher_type, cfg.rexmoe)
        padding = expert_padding.for_config(cfg, gated=layer_config.gated_linear_unit)
        bank = bank_class(experts_spec.module, cfg.model.resolved_moe_grouped_gemm())(
            placement.local_slots, expert_padding.bank_config(layer_config, padding),
            experts_spec.submodules, pg_collection,
            group=group, placement=placement, num_moe_layers=plan.num_moe_layers)
        expert_padding.attach(bank, padding)  # zero pads; checkpoints hold the unpadded width
        counts = ScopedCounts(balance_cfg.group_aux_scope, pg_collection.tp_cp, tp_dp_cp)
        balance = GroupBalance(group.size, group.num_candidates, balance_cfg.group_aux_coeff, counts)
        runtimes[group.index] = ReuseGroupRuntime(
            group=group, plan=plan, rexmoe=cfg.rexmoe, placement=placement, layer_config=layer_config,
            bank=bank, balance=balance, psr_state=psr_state,
            dispatcher_class=DedupAllToAllDispatcher if dispatcher_type == DEDUP_DISPATCHER else None)
    return runtimes
