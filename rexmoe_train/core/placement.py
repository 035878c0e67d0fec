"""Reuse-aware expert placement.

With expert-parallel size ep dividing N, EP rank k holds the same contiguous N/ep slice of EVERY owner
layer's experts in a group — the slice megatron would give it for each layer alone. So each router's
r*N candidates are spread r*N/ep per rank, and memory per rank equals vanilla MoE.

megatron's dispatchers assume the experts of a layer are numbered so that rank k owns the contiguous
ids [k*L, (k+1)*L) (L = local experts). We call that numbering *physical*. The router works in
*candidate* order (spec §2) and permutes its output columns into physical order; the dispatcher and the
expert bank only ever see physical ids. This map is the single source of truth for router, bank,
checkpoint and converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    experts_per_layer: int  # N
    group_size: int  # r of this group
    ep_size: int

    def __post_init__(self) -> None:
        if self.experts_per_layer % self.ep_size:
            raise ValueError(
                f"expert_model_parallel_size={self.ep_size} must divide num_moe_experts="
                f"{self.experts_per_layer}")

    @property
    def num_candidates(self) -> int:
        return self.group_size * self.experts_per_layer

    @property
    def experts_per_rank_per_layer(self) -> int:
        return self.experts_per_layer // self.ep_size

    @property
    def local_slots(self) -> int:
        """Experts stored on each EP rank for this group (r*N/ep)."""
        return self.group_size * self.experts_per_rank_per_layer

    def locate(self, candidate: int) -> tuple[int, int]:
        """Candidate -> (EP rank, local slot)."""
        owner, expert = divmod(candidate, self.experts_per_layer)
        rank, within = divmod(expert, self.experts_per_rank_per_layer)
        return rank, owner * self.experts_per_rank_per_layer + within

    def slot_owner_expert(self, rank: int, slot: int) -> tuple[int, int]:
        """(EP rank, local slot) -> (owner index within the group, expert index within the owner)."""
        owner, within = divmod(slot, self.experts_per_rank_per_layer)
        return owner, rank * self.experts_per_rank_per_layer + within

    def physical_id(self, candidate: int) -> int:
        rank, slot = self.locate(candidate)
        return rank * self.local_slots + slot

    @cached_property
    def candidate_of_physical(self) -> torch.Tensor:
        """Long [r*N]: column permutation taking candidate-ordered tensors to physical order."""
        perm = torch.empty(self.num_candidates, dtype=torch.long)
        for c in range(self.num_candidates):
            perm[self.physical_id(c)] = c
        return perm

    @property
    def is_identity(self) -> bool:
        return self.ep_size == 1 or self.group_size == 1

    def permutation_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`candidate_of_physical` on ``device``, copied there once: a copy per router call
        (two per call: probs and routing map) stalls the host each time on a GPU."""
        copies = self.__dict__.setdefault("_device_permutations", {})  # frozen: bypass __setattr__
        key = str(device)
        if key not in copies:
            copies[key] = self.candidate_of_physical.to(device)
        return copies[key]

    def to_physical(self, candidate_ordered: torch.Tensor) -> torch.Tensor:
        """[T, r*N] in candidate order -> [T, r*N] in physical (dispatcher) order."""
        if self.is_identity:
            return candidate_ordered
        return candidate_ordered.index_select(-1, self.permutation_on(candidate_ordered.device))

    def describe(self) -> str:
        """Printable map candidate -> (rank, slot)."""
        rows = [f"ExpertPlacement N={self.experts_per_layer} r={self.group_size} ep={self.ep_size}"]
        for c in range(self.num_candidates):
            owner, expert = divmod(c, self.experts_per_layer)
            rank, slot = self.locate(c)
            rows.append(f"  candidate {c:4d} (owner +{owner}, expert {expert:3d}) -> rank {rank}, slot {slot}")
        return "\n".join(rows)
