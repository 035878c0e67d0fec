"""The ReXMoE router: one per MoE layer, over the r*N candidates of the layer's reuse group.

It is megatron's TopKRouter (weight [r*N, hidden], fp32 gating linear, z-loss, aux-loss plumbing)
with three changes: the PSR availability mask, the ReXMoE gate functions and balance losses, and a
final column permutation from candidate order to the physical order of the expert placement (what
the dispatcher and the expert bank index by).
"""

from __future__ import annotations

from typing import Optional

import torch
from rexmoe_train import platform

platform.setup()  # before megatron: it binds torch.cuda names at import

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

from rexmoe_train.config.schema import ReXMoEConfig  # noqa: E402
from rexmoe_train.model.balance import GroupBalance, ScopedCounts, switch_loss  # noqa: E402
from rexmoe_train.model.gating import gate  # noqa: E402
from rexmoe_train.model.psr import PSRSchedule, PSRState  # noqa: E402
from rexmoe_train.model.reuse import ReuseGroup  # noqa: E402
from rexmoe_train.parallel.placement import ExpertPlacement  # noqa: E402


class ReXMoERouter(TopKRouter):
    def __init__(
        self,
        config,
        pg_collection=None,
        *,
        group: ReuseGroup,
        moe_layer: int,
        rexmoe: ReXMoEConfig,
        psr_state: PSRState,
        placement: ExpertPlacement,
        group_balance: GroupBalance,
    ) -> None:
        # `config.num_moe_experts` is already the group's candidate count (set by ReXMoELayer).
        super().__init__(config=config, pg_collection=pg_collection)
        self.group = group
        self.moe_layer = moe_layer
        self.position_in_group = moe_layer - group.first_moe_layer
        self.gating_kind = rexmoe.gating
        self.mask_on = rexmoe.psr.mask_on
        self.psr_state = psr_state
        self.psr_schedule = PSRSchedule(
            rexmoe.psr.schedule, group.experts_per_layer, group.size,
            rexmoe.psr.start_step, rexmoe.psr.end_step)
        self.protected = group.local_candidates(moe_layer) if rexmoe.psr.protect_local else None
        self.placement = placement
        self.layer_aux_coeff = rexmoe.balance.layer_aux_coeff
        tp_dp_cp = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        self.layer_counts = ScopedCounts(rexmoe.balance.layer_aux_scope, self.tp_cp_group, tp_dp_cp)
        self.group_balance = group_balance
        # Tokens routed to each candidate during this optimizer step (training only), for metrics.
        self.register_buffer("step_load", torch.zeros(group.num_candidates, dtype=torch.float64),
                             persistent=False)

    # -- PSR ---------------------------------------------------------------------------------------
    def available(self) -> torch.Tensor:
        """Bool [r*N] of the candidates this router may choose at the current step."""
        return self.psr_state.allowed(self.psr_schedule, self.moe_layer, self.protected)

    def reset_step_state(self) -> None:
        """Called by the trainer before each optimizer step."""
        self.step_load.zero_()
        self.layer_counts.reset()
        self.group_balance.reset()

    # -- routing -----------------------------------------------------------------------------------
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError("ReXMoERouter does not support padding masks yet")
        logits = logits.view(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        allowed = self.available()
        out = gate(logits, self.topk, self.gating_kind, allowed, self.mask_on)
        probs = out.probs
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.step_load += out.routing_map.sum(dim=0).to(self.step_load.dtype)
            probs = self._attach_balance_losses(probs, out, allowed)
        return self.placement.to_physical(probs), self.placement.to_physical(out.routing_map)

    def _attach_balance_losses(self, probs: torch.Tensor, out, allowed: torch.Tensor) -> torch.Tensor:
        tokens = out.routing_map.shape[0]
        if self.layer_aux_coeff > 0:
            counts, total_tokens = self.layer_counts(out.routing_map.sum(dim=0), tokens)
            loss = switch_loss(out.aux_scores, counts, total_tokens, self.topk,
                               int(allowed.sum()), self.layer_aux_coeff)
            probs = self.attach_and_log_load_balancing_loss(
                probs, self.layer_aux_coeff, loss, "load_balancing_loss",
                self.layer_counts.group, reduce_group_has_dp=self.layer_counts.scope == "global_batch",
                valid_token_count=tokens)
        if self.group_balance.coeff > 0:
            pooled = self.group_balance.add(self.position_in_group, out.aux_scores, out.routing_map,
                                            self.topk)
            if pooled is not None:
                counts = self.group_balance.counts
                probs = self.attach_and_log_load_balancing_loss(
                    probs, self.group_balance.coeff, pooled, "group_load_balancing_loss",
                    counts.group, reduce_group_has_dp=counts.scope == "global_batch",
                    valid_token_count=tokens)
        return probs
