"""The ReXMoE router: one per MoE layer, over the r*N candidates of the layer's reuse group.

It is megatron's TopKRouter (weight [r*N, hidden], fp32 gating linear, z-loss, aux-loss plumbing)
with three changes: the PSR availability mask, the ReXMoE gate functions and balance losses, and a
final column permutation from candidate order to the physical order of the expert placement (what
the dispatcher and the expert bank index by).

Aux-loss-free balancing: with ``rexmoe.balance.moe_router_enable_expert_bias`` the layer's config
turns on megatron's own ``expert_bias`` buffer (fp32, [r*N] in candidate order, persistent: saved
and resharded with the router like megatron's, kept fp32 by TopKRouter.forward); this router adds it
to the top-k choice (gating.gate's ``selection_bias``) and balance.update_expert_bias moves it after
each optimizer step. megatron's own update (finalize_model_grads) stays off: it keys on the model's
config, where the flag is not set, and would ignore PSR masks and the physical scope.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity
from megatron.core.transformer.moe.router import TopKRouter

from rexmoe_train.config.schema import ReXMoEConfig
from rexmoe_train.core.gating import AvailabilityMask, gate, normalize_gates
from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.psr import PSRSchedule, PSRState
from rexmoe_train.core.reuse import ReuseGroup
from rexmoe_train.kernels._triton import use_triton
from rexmoe_train.kernels.fused_router import fused_router
from rexmoe_train.model.balance import GroupBalance, ScopedCounts, switch_loss


@dataclass
class _Counted:
    """What a router counted for one micro-batch, reused when the micro-batch's forward is replayed."""

    layer: Optional[tuple] = None  # (counts at the layer scope, tokens) for the per-layer loss
    group: Optional[object] = None  # the GroupBalance micro-batch entry


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
        # the fused Triton router computes exactly gate(..., "softmax_then_topk", .., "scores")
        self.fused_gate = (use_triton(rexmoe.kernels) and rexmoe.gating == "softmax_then_topk"
                           and rexmoe.psr.mask_on == "scores" and self.expert_bias is None)
        self.gate_normalization = rexmoe.gate_normalization
        self.kernels = rexmoe.kernels
        self.psr_state = psr_state
        self.psr_schedule = PSRSchedule(
            rexmoe.psr.schedule, group.experts_per_layer, group.size,
            rexmoe.psr.start_step, rexmoe.psr.end_step, rexmoe.psr.mask_draw)
        self.protected = group.local_candidates(moe_layer) if rexmoe.psr.protect_local else None
        self.placement = placement
        self.layer_aux_coeff = rexmoe.balance.layer_aux_coeff
        tp_dp_cp = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        self.layer_counts = ScopedCounts(rexmoe.balance.layer_aux_scope, self.tp_cp_group, tp_dp_cp)
        self.group_balance = group_balance
        # Tokens routed to each candidate during this optimizer step (training only), for metrics.
        self.register_buffer("step_load", torch.zeros(group.num_candidates, dtype=torch.float64),
                             persistent=False)
        # (token, expert) assignments chosen before any capacity drop: step_load.sum() / this is
        # the share kept
        self.register_buffer("step_routed", torch.zeros((), dtype=torch.float64), persistent=False)
        # Activation recompute replays a checkpointed forward in the backward pass. Every reentrant
        # checkpoint (megatron's tensor_parallel.checkpoint and te_checkpoint, used by full and
        # selective "moe" recompute) runs the first forward WITHOUT autograd and the replay WITH it,
        # in micro-batch order. So: a training forward without autograd counts and queues what it
        # counted; a forward with autograd while that queue is non-empty is the replay: it counts
        # nothing and attaches the balance losses against the queued counts. Without recompute the
        # queue stays empty and every forward counts. (Eval forwards run in eval mode: not counted.)
        self._to_replay: deque[_Counted] = deque()
        self.replaying = False  # the current forward is a recompute replay (read by the dispatcher)
        self._mask: Optional[AvailabilityMask] = None  # the step's PSR mask with its device copy

    # Token counts must stay exact float64 whatever the module is cast to: Float16Module (bf16, the
    # GPU default) calls .bfloat16() on the whole model, which casts every floating buffer, and bf16
    # counts stop being exact at 256 (metrics, update_expert_bias). Device moves still apply.
    _EXACT_COUNTERS = ("step_load", "step_routed")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self._EXACT_COUNTERS:
            buffer = self._buffers[name]
            if buffer.dtype != torch.float64:
                self._buffers[name] = buffer.to(torch.float64)
        return self

    # -- PSR ---------------------------------------------------------------------------------------
    def available(self) -> torch.Tensor:
        """Bool [r*N] of the candidates this router may choose at the current step."""
        return self.psr_state.allowed(self.psr_schedule, self.moe_layer, self.protected)

    def available_mask(self) -> AvailabilityMask:
        """:meth:`available` with its device copy, made once per step (PSRState hands out the same
        host tensor for the whole step, so its identity is the cache key)."""
        host = self.available()
        if self._mask is None or self._mask.host is not host:
            self._mask = AvailabilityMask(host)
        return self._mask

    def reset_step_state(self) -> None:
        """Called by the trainer before each optimizer step."""
        self.step_load.zero_()
        self.step_routed.zero_()
        self.layer_counts.reset()
        self.group_balance.reset()
        self._to_replay.clear()

    # -- routing -----------------------------------------------------------------------------------
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError("ReXMoERouter does not support padding masks yet")
        logits = logits.view(-1, self.config.num_moe_experts)
        logits = self.apply_z_loss(logits)
        mask = self.available_mask()
        allowed = mask.host
        if self.fused_gate:
            out = fused_router(logits, self.topk, mask, dense=True, impl=self.kernels)
        else:
            out = gate(logits, self.topk, self.gating_kind, mask, self.mask_on,
                       selection_bias=self.expert_bias)
        probs = normalize_gates(out.probs, self.gate_normalization, mask.count,
                                self.group.experts_per_layer)
        routing_map = out.routing_map
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = self._drop_over_capacity(probs, routing_map, allowed)
        self.replaying = False
        if self.training:
            grad = torch.is_grad_enabled()
            if grad and self._to_replay:
                counted, self.replaying = self._to_replay.popleft(), True
            else:
                counted = self._count(routing_map, out, autograd=grad)
                if not grad:
                    self._to_replay.append(counted)
            if grad:
                # balance losses see the routing before the drop, as megatron's TopKRouter does
                probs = self._attach_balance_losses(probs, out, allowed, counted)
        return self.placement.to_physical(probs), self.placement.to_physical(routing_map)

    @torch.no_grad()
    def _count(self, routing_map: torch.Tensor, out, autograd: bool) -> _Counted:
        """Everything counted once per micro-batch: the step's load (what the experts receive, after
        any drop) and the balance losses' counts (before the drop)."""
        self.step_load += routing_map.sum(dim=0).to(self.step_load.dtype)
        self.step_routed += out.routing_map.sum()
        counted = _Counted()
        if self.layer_aux_coeff > 0:
            counted.layer = self.layer_counts(out.routing_map.sum(dim=0), out.routing_map.shape[0])
        if self.group_balance.coeff > 0:
            counted.group = self.group_balance.count(self.position_in_group, out.routing_map, autograd)
        return counted

    def _drop_over_capacity(self, probs: torch.Tensor, routing_map: torch.Tensor, allowed: torch.Tensor):
        """megatron's capacity rule, ceil(C * tokens * k / experts), over the N_t AVAILABLE
        candidates only: masked candidates receive nothing, so counting them would shrink every
        quota by N_t / (r*N) while PSR ramps.

        probs: megatron's own policy (each candidate keeps its highest gate values). position: the
        EARLIEST tokens, exactly; megatron's version takes a top-k over the 0/1 routing map, whose
        choice among ties is unspecified (on CPU it keeps later tokens too)."""
        # the PSR mask lives on the CPU (core/psr.py): take its columns there (no device sync), then
        # index the probs on their own device
        columns = allowed.cpu().nonzero().squeeze(1).to(probs.device)
        sub_probs, sub_map = probs.index_select(1, columns), routing_map.index_select(1, columns)
        if self.config.moe_token_drop_policy == "position":
            capacity = get_capacity(sub_map.shape[0] * self.topk, sub_map.shape[1],
                                    self.config.moe_expert_capacity_factor)
            kept_map = sub_map & (sub_map.long().cumsum(dim=0) <= capacity)
            kept_probs = sub_probs * kept_map
        else:
            kept_probs, kept_map = apply_router_token_dropping(
                sub_probs, sub_map, self.topk, self.config.moe_expert_capacity_factor, "probs")
        probs = torch.zeros_like(probs).index_copy(1, columns, kept_probs)
        routing_map = torch.zeros_like(routing_map).index_copy(1, columns, kept_map)
        return probs, routing_map

    def _attach_balance_losses(self, probs: torch.Tensor, out, allowed: torch.Tensor,
                               counted: _Counted) -> torch.Tensor:
        tokens = out.routing_map.shape[0]
        if self.layer_aux_coeff > 0:
            counts, total_tokens = counted.layer
            loss = switch_loss(out.aux_scores, counts, total_tokens, self.topk,
                               int(allowed.sum()), self.layer_aux_coeff)
            probs = self.attach_and_log_load_balancing_loss(
                probs, self.layer_aux_coeff, loss, "load_balancing_loss",
                self.layer_counts.group, reduce_group_has_dp=self.layer_counts.scope == "global_batch",
                valid_token_count=tokens)
        if self.group_balance.coeff > 0:
            pooled = self.group_balance.loss(counted.group, self.position_in_group, out.aux_scores,
                                             self.topk, share=self.replaying)
            if pooled is not None:
                counts = self.group_balance.counts
                probs = self.attach_and_log_load_balancing_loss(
                    probs, self.group_balance.coeff, pooled, "group_load_balancing_loss",
                    counts.group, reduce_group_has_dp=counts.scope == "global_batch",
                    valid_token_count=tokens)
        return probs
