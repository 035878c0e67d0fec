"""Load-balancing losses for ReXMoE routers (spec §4; the paper does not say what it used).

Both losses are megatron's switch loss  E * sum_i f_i * P_i  (f: fraction of routed assignments,
P: mean gate score), computed with megatron's own `switch_load_balancing_loss_func` so that r = 1
reproduces megatron's ``aux_loss`` exactly.

- Per-layer: over the r*N candidates of one router. E is the number of candidates available at this
  step (N_t), so a perfectly balanced router scores 1 whatever the PSR stage.
- Group-pooled: over the load each PHYSICAL expert receives from all r routers of its group. Every
  router of a group indexes the same candidate space, so pooling is a sum over layers. The loss needs
  the counts of all r layers; the group's last layer computes it once the others have run in the same
  forward pass (a group never spans pipeline stages) and attaches it to its own output.

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


class GroupBalance:
    """Collects the routers of one reuse group during a forward pass and forms the pooled loss."""

    def __init__(self, group_size: int, num_candidates: int, coeff: float, counts: ScopedCounts) -> None:
        self.group_size = group_size
        self.num_candidates = num_candidates
        self.coeff = coeff
        self.counts = counts
        self._scores: dict[int, torch.Tensor] = {}
        self._counts: dict[int, torch.Tensor] = {}
        self._tokens = 0

    def reset(self) -> None:
        self._scores.clear()
        self._counts.clear()
        self.counts.reset()

    def add(self, position: int, aux_scores: torch.Tensor, routing_map: torch.Tensor,
            topk: int) -> Optional[torch.Tensor]:
        """Record layer ``position`` of the group; returns the pooled loss once all have reported."""
        self._scores[position] = aux_scores.sum(dim=0)
        self._counts[position] = routing_map.sum(dim=0)
        self._tokens = routing_map.shape[0]
        if len(self._scores) < self.group_size:
            return None
        pooled_scores = torch.stack(list(self._scores.values())).sum(dim=0, keepdim=True)
        pooled_counts = torch.stack(list(self._counts.values())).sum(dim=0)
        self._scores.clear()
        self._counts.clear()
        counts, total_tokens = self.counts(pooled_counts, self._tokens)
        # r routers x T tokens "routing events": the same normalisation as one router over r*T tokens.
        return switch_loss(pooled_scores, counts, total_tokens * self.group_size, topk,
                           self.num_candidates, self.coeff)


def load_violation(load: torch.Tensor, available: Optional[torch.Tensor] = None) -> float:
    """MaxVio = (max load - mean load) / mean load over the available candidates (0 if no tokens)."""
    if available is not None:
        load = load[available]
    mean = load.float().mean()
    if mean <= 0:
        return 0.0
    return float((load.float().max() - mean) / mean)
