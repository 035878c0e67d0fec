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
from rexmoe_train import platform

platform.setup()  # before megatron: it binds torch.cuda names at import

from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region  # noqa: E402
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func  # noqa: E402


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
