"""ReXMoELayer: megatron's MoELayer whose router sees its reuse group's r*N candidates and whose
experts are the group's shared bank.

Everything else — dispatch, expert compute, combine, shared experts — is megatron's MoELayer code.
What the group's layers share (placement, bank, balance state, dispatcher class, the layer config
with ``num_moe_experts = r*N``) comes in one :class:`~rexmoe_train.model.runtime.ReuseGroupRuntime`
built by ``build_model``: constructing a layer registers nothing anywhere and creates nothing shared.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from rexmoe_train.model.router import ReXMoERouter
from rexmoe_train.model.runtime import ReuseGroupRuntime


class _KnownMLPType(logging.Filter):
    # TransformerLayer logs "Unknown MLP type" for any MoELayer subclass (an identity check); the
    # subclass then falls back to the global process groups, which is what this project uses.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPType())


def _bank_placeholder(*args, **kwargs):
    """The layer spec's "experts": megatron's build_module returns a plain function as is, and the
    layer then points at its group's bank (built once, in build_model)."""
    raise AssertionError("ReXMoELayer experts are the group's bank")


class ReXMoELayer(MoELayer):
    def __init__(self, config, submodules: MoESubmodules = None, layer_number=None, pg_collection=None,
                 *, runtime: ReuseGroupRuntime, moe_layer: int) -> None:
        # TransformerLayer forwards pg_collection only to exact MoELayer instances; subclasses get the
        # global parallel_state groups, which is what this project uses.
        pg_collection = pg_collection or get_default_pg_collection()
        group = runtime.group
        assert moe_layer in group.moe_layers, (moe_layer, group)
        submodules = replace(
            submodules,
            experts=_bank_placeholder,
            router=partial(ReXMoERouter, group=group, moe_layer=moe_layer, rexmoe=runtime.rexmoe,
                           psr_state=runtime.psr_state, placement=runtime.placement,
                           group_balance=runtime.balance),
        )
        layer_config = runtime.layer_config
        super().__init__(layer_config, submodules, layer_number, pg_collection)
        if runtime.dispatcher_class is not None:
            self.token_dispatcher = runtime.dispatcher_class(
                self.num_local_experts, self.local_expert_indices, config=layer_config,
                pg_collection=pg_collection, kernels=runtime.rexmoe.kernels)
            router = self.router
            self.token_dispatcher.is_replay = lambda: router.replaying
        # A plain attribute, not a registered submodule: the bank is registered once, on the model.
        self.__dict__["experts"] = runtime.bank
        self.moe_layer = moe_layer
        self.group = group
        self.placement = runtime.placement
