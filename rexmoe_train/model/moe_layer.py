"""ReXMoELayer: megatron's MoELayer whose router sees its reuse group's r*N candidates and whose
experts are the group's shared bank.

Everything else — dispatch, expert compute, combine, shared experts — is megatron's MoELayer code.
The layer's config is a shallow copy with ``num_moe_experts = r*N``: to the dispatcher, a reuse group
is just an MoE layer with r times the experts, placed so each EP rank holds r*N/ep of them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from functools import partial

from rexmoe_train import platform

platform.setup()  # before megatron: it binds torch.cuda names at import

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: E402

from rexmoe_train.config.schema import ReXMoEConfig  # noqa: E402
from rexmoe_train.model.balance import GroupBalance, ScopedCounts  # noqa: E402
from rexmoe_train.model.experts import ExpertBanks, bank_class  # noqa: E402
from rexmoe_train.model.psr import PSRState  # noqa: E402
from rexmoe_train.model.reuse import ReusePlan  # noqa: E402
from rexmoe_train.model.router import ReXMoERouter  # noqa: E402
from rexmoe_train.parallel.dispatcher import DEDUP_DISPATCHER, DedupAllToAllDispatcher  # noqa: E402
from rexmoe_train.parallel.placement import ExpertPlacement  # noqa: E402


class _KnownMLPType(logging.Filter):
    # TransformerLayer logs "Unknown MLP type" for any MoELayer subclass (an identity check); the
    # subclass then falls back to the global process groups, which is what this project uses.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPType())


@dataclass
class ReXMoEContext:
    """What the MoE layers of one model chunk share: the plan, the PSR step, the banks."""

    plan: ReusePlan
    rexmoe: ReXMoEConfig
    psr_state: PSRState
    banks: ExpertBanks
    routers: list = field(default_factory=list)
    group_balances: dict = field(default_factory=dict)
    moe_grouped_gemm: bool = False  # model.resolved_moe_grouped_gemm(): grouped local bank


def _not_built_here(*args, **kwargs):  # placeholder "experts" spec: the bank is built once per group
    raise AssertionError("ReXMoELayer experts come from the group's ExpertBank")


class ReXMoELayer(MoELayer):
    def __init__(self, config, submodules: MoESubmodules = None, layer_number=None, pg_collection=None,
                 *, context: ReXMoEContext, moe_layer: int) -> None:
        # TransformerLayer forwards pg_collection only to exact MoELayer instances; subclasses get the
        # global parallel_state groups, which is what this project uses.
        pg_collection = pg_collection or get_default_pg_collection()
        plan = context.plan
        group = plan.group_of(moe_layer)
        placement = ExpertPlacement(group.experts_per_layer, group.size, pg_collection.ep.size())

        layer_config = copy.copy(config)
        layer_config.num_moe_experts = group.num_candidates
        # Balance losses are the router's own (balance.py); megatron's would double count.
        layer_config.moe_router_load_balancing_type = "none"
        layer_config.moe_aux_loss_coeff = 0.0
        # megatron's MoELayer rejects unknown dispatcher names: build it with alltoall, then swap.
        dedup = config.moe_token_dispatcher_type == DEDUP_DISPATCHER
        if dedup:
            layer_config.moe_token_dispatcher_type = "alltoall"

        balance = context.rexmoe.balance
        group_balance = context.group_balances.get(group.index)
        if group_balance is None:
            from megatron.core import parallel_state

            counts = ScopedCounts(balance.group_aux_scope, pg_collection.tp_cp,
                                  parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
            group_balance = GroupBalance(group.size, group.num_candidates, balance.group_aux_coeff, counts)
            context.group_balances[group.index] = group_balance

        experts_spec = submodules.experts
        submodules = replace(
            submodules,
            experts=_not_built_here,
            router=partial(ReXMoERouter, group=group, moe_layer=moe_layer, rexmoe=context.rexmoe,
                           psr_state=context.psr_state, placement=placement,
                           group_balance=group_balance),
        )
        super().__init__(layer_config, submodules, layer_number, pg_collection)
        if dedup:
            self.token_dispatcher = DedupAllToAllDispatcher(
                self.num_local_experts, self.local_expert_indices, config=layer_config,
                pg_collection=pg_collection, kernels=context.rexmoe.kernels)
            router = self.router
            self.token_dispatcher.is_replay = lambda: router.replaying

        build_bank = bank_class(experts_spec.module, context.moe_grouped_gemm)
        bank = context.banks.get_or_build(group, lambda: build_bank(
            self.num_local_experts, layer_config, experts_spec.submodules, pg_collection,
            group=group, placement=placement, num_moe_layers=plan.num_moe_layers))
        # A plain attribute, not a registered submodule: the bank is registered once, on the model.
        self.__dict__["experts"] = bank
        self.moe_layer = moe_layer
        self.group = group
        self.placement = placement
        context.routers.append(self.router)
