"""Load-balancing losses for ReXMoE routers (spec §4; the paper does not say what it used).

Both losses are megatron's switch loss  E * sum_i f_i * P_i  (f: fraction of routed assignments,
P: mean gate score), computed with megatron's own `switch_load_balancing_loss_func` so that r = 1
reproduces megatron's ``aux_loss`` exactly.

- Per-layer: over the r*N candidates of one router. E is the number of candidates available at this
  step (N_t), so a perfectly balanced router scores 1 whatever the PSR stage.
- Group-pooled: over the load each PHYSICAL expert receives from all r routers of its group. Every
  router of a group indexes the same candidate space, so pooling is a sum over layers. The loss needs
  the counts of all r layers; the group's last layer computes it once the others have run in the same
  forward pass (a group never spans pipeline stages) and attaches it to its own output (under
  activation recompute each layer attaches its own linear term instead, see GroupBalance).

Scope: ``micro_batch`` counts tokens of the micro-batch (reduced over TP/CP like megatron's aux_loss);
``global_batch`` accumulates counts over the micro-batches of the step and reduces them over data
parallelism too (megatron's global_aux_loss).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func


class ScopedCounts:
    """Token counts per candidate at micro-batch or global-batch scope."""

    def __init__(self, scope: str, micro_group: torch.distributed.ProcessGroup,
                 global_group: torch.distributed.ProcessGroup) -> None:
        self.scope = scope
        self.group = global_group if scope == "global_batch" else micro_group
        self._sum: Optional[torch.Tensor] = None
        self._micro_batches = 0

    def reset(self) -> None:
        self._sum, self._micro_batches = None, 0

    def __call__(self, local_counts: torch.Tensor, local_tokens: int) -> tuple[torch.Tensor, int]:
        """-> (counts at this scope, tokens those counts cover, per micro-batch)."""
        counts = reduce_from_tensor_model_parallel_region(local_counts.float(), self.group)
        total_tokens = local_tokens * self.group.size()
        if self.scope == "micro_batch":
            return counts, total_tokens
        # global batch: running mean over the step's micro-batches (as megatron's global_aux_loss)
        self._sum = counts if self._sum is None else self._sum + counts
        self._micro_batches += 1
        return self._sum / self._micro_batches, total_tokens


def switch_loss(scores: torch.Tensor, counts: torch.Tensor, total_tokens: int, topk: int,
                num_experts: int, coeff: float) -> torch.Tensor:
    return switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=counts, total_num_tokens=total_tokens, topk=topk,
        num_experts=num_experts, moe_aux_loss_coeff=coeff, fused=False)


class _GroupMicroBatch:
    """One micro-batch of a reuse group: the layers' counts, the pooled counts once all r have
    routed, and the gate scores of layers that routed with autograd before the pool was complete."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.pooled: Optional[tuple[torch.Tensor, int]] = None  # (counts at scope, tokens)
        self.pending_scores: dict[int, torch.Tensor] = {}


class GroupBalance:
    """Collects the routers of one reuse group during a forward pass and forms the pooled loss.

    The switch loss is linear in the gate scores, so the pooled loss is the sum of one term per
    layer, each with the (constant) pooled counts. Normally all r layers route with autograd in one
    forward: the last one attaches the whole loss. Under activation recompute a checkpointed layer
    routes twice: first without autograd (its counts join the pool here, once), then again in the
    backward pass, when it attaches its own term (``share``) against the same pooled counts. Layers
    that ran with autograd before the pool completed are folded into the completing layer's loss."""

    def __init__(self, group_size: int, num_candidates: int, coeff: float, counts: ScopedCounts) -> None:
        self.group_size = group_size
        self.num_candidates = num_candidates
        self.coeff = coeff
        self.counts = counts
        self._current = _GroupMicroBatch()

    def reset(self) -> None:
        self._current = _GroupMicroBatch()
        self.counts.reset()

    def count(self, position: int, routing_map: torch.Tensor, autograd: bool = True) -> _GroupMicroBatch:
        """Record layer ``position``'s counts (once per micro-batch); -> its micro-batch entry.

        ``autograd``: this forward builds a graph (False: the first pass of a recomputed layer)."""
        entry = self._current
        entry.counts[position] = routing_map.sum(dim=0)
        if len(entry.counts) == self.group_size:
            pooled_counts = torch.stack(list(entry.counts.values())).sum(dim=0)
            entry.pooled = self.counts(pooled_counts, routing_map.shape[0])
            self._current = _GroupMicroBatch()
            if entry.pending_scores and not autograd:
                raise RuntimeError(
                    "group-pooled balance loss: a reuse group's last MoE layer is recomputed but an "
                    "earlier one is not; recompute whole reuse groups (model.recompute_*)")
        return entry

    def loss(self, entry: _GroupMicroBatch, position: int, aux_scores: torch.Tensor, topk: int,
             share: bool) -> Optional[torch.Tensor]:
        """The pooled loss term(s) to attach to layer ``position``'s output, or None (not yet).

        ``share``: a recompute replay, attach this layer's own term only."""
        scores = aux_scores.sum(dim=0)
        if entry.pooled is None:  # pool incomplete: a later layer of this forward attaches it
            entry.pending_scores[position] = scores
            return None
        if share:
            terms = [scores]
        else:
            terms = [*entry.pending_scores.values(), scores]
            entry.pending_scores.clear()
        counts, tokens = entry.pooled
        # r routers x T tokens "routing events": the same normalisation as one router over r*T tokens.
        return switch_loss(torch.stack(terms).sum(dim=0, keepdim=True), counts,
                           tokens * self.group_size, topk, self.num_candidates, self.coeff)


def load_violation(load: torch.Tensor, available: Optional[torch.Tensor] = None) -> float:
    """MaxVio = (max load - mean load) / mean load over the available candidates (0 if no tokens)."""
    if available is not None:
        load = load[available]
    mean = load.float().mean()
    if mean <= 0:
        return 0.0
    return float((load.float().max() - mean) / mean)


# --------------------------------------------------------------------------------------------------
# aux-loss-free balancing (rexmoe.balance.moe_router_enable_expert_bias)
# --------------------------------------------------------------------------------------------------
def bias_update(load: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor, rate: float,
                bias: torch.Tensor) -> torch.Tensor:
    """bias + rate * sign(target - load) on the allowed candidates; the others keep their bias.

    With every candidate allowed and target = the mean load this is megatron's
    get_updated_expert_bias (same ops: fp32 sign times the rate, added to the fp32 bias)."""
    step = torch.sign(target - load).to(bias.dtype) * rate
    return torch.where(allowed.to(bias.device), bias + step, bias)


@torch.no_grad()
def update_expert_bias(routers: list, scope: str, rate: float) -> None:
    """One aux-loss-free update after an optimizer step, from the step's global-batch load.

    Every router's load (``step_load``: the tokens its candidates received in this step's training
    micro-batches, after any capacity drop, as megatron's local_tokens_per_expert) is summed over the
    ranks of its pipeline stage (tensor x data x context parallel: the tokens of one global batch)
    in ONE all-reduce, so every replica computes the same new bias. A router's PSR-masked candidates
    were not selectable this step: they are left out of the mean and keep their bias.

    scope router: each router's r*N biases move by the sign of (its mean load over its available
    candidates - the candidate's load). scope physical: one bias per physical expert of a group, kept
    as identical copies in the group's r routers (so the checkpoint layout is the same as for scope
    router); the expert's load is the sum over the r routers, its target the sum of each router's
    mean over the routers that could select it (with nothing masked: the mean of the pooled loads).
    A group's routers always live on one pipeline stage, so the pooled sum needs no cross-stage
    communication; stages run this on their own routers (a stage without MoE layers skips it).
    """
    routers = [r for r in routers if getattr(r, "expert_bias", None) is not None]
    if not routers:
        return
    width = max(r.expert_bias.numel() for r in routers)
    loads = torch.zeros(len(routers), width, dtype=torch.float64, device=routers[0].expert_bias.device)
    for row, router in zip(loads, routers):
        row[: router.step_load.numel()] = router.step_load
    from megatron.core import parallel_state

    torch.distributed.all_reduce(
        loads, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
    if scope == "router":
        for load, router in zip(loads, routers):
            allowed = router.available().to(load.device)
            load = load[: allowed.numel()]
            target = load[allowed].sum() / allowed.sum()
            router.expert_bias.copy_(bias_update(load, allowed, target, rate, router.expert_bias))
        return
    if scope != "physical":
        raise ValueError(f"expert_bias_scope must be router or physical, got {scope!r}")
    groups: dict[int, list] = {}
    for load, router in zip(loads, routers):
        groups.setdefault(router.group.index, []).append((load, router))
    for members in groups.values():
        size = members[0][1].expert_bias.numel()
        pooled = torch.zeros(size, dtype=torch.float64, device=loads.device)
        target = torch.zeros_like(pooled)
        selectable = torch.zeros(size, dtype=torch.bool, device=loads.device)
        for load, router in members:
            allowed = router.available().to(load.device)
            pooled += load[:size]
            target += allowed * (load[:size][allowed].sum() / allowed.sum())
            selectable |= allowed
        first = members[0][1].expert_bias
        new = bias_update(pooled, selectable, target, rate, first)
        for _, router in members:
            router.expert_bias.copy_(new)


def expert_bias_ranges(routers: list, num_groups: int, device) -> list[float]:
    """max - min of the selection biases of each reuse group's routers (all ranks: world MAX)."""
    ext = torch.full((num_groups, 2), float("-inf"), dtype=torch.float64, device=device)
    for router in routers:
        bias = getattr(router, "expert_bias", None)
        if bias is not None:
            g = router.group.index
            ext[g, 0] = torch.maximum(ext[g, 0], bias.max().double())
            ext[g, 1] = torch.maximum(ext[g, 1], -bias.min().double())
    torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
    return [round(float(hi + neg_lo), 6) if torch.isfinite(hi) else 0.0 for hi, neg_lo in ext.cpu()]
