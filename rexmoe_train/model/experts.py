"""Expert banks: the r*N experts of a reuse group, each stored once.

A bank is a megatron SequentialMLP over the group's local slots (r*N/ep on each EP rank, in the
placement's slot order), so the megatron expert MLPs, their `is_expert` gradient reduction over the
expert-data-parallel group, and the expert optimizer all apply unchanged. The banks are registered
once on the model (``GPTModel.expert_banks``), never inside a layer: the MoE layers hold plain,
unregistered references, so parameters, gradients and checkpoints see each expert exactly once.

Checkpoint keys are by (owner MoE layer, expert) — ``expert_banks.experts.<param>`` with global shape
[num_moe_layers, N, ...] — i.e. independent of r, of the placement and of the EP size, and the same
layout megatron uses for a vanilla model's per-layer experts.
"""

from __future__ import annotations

from typing import Callable

import torch
from rexmoe_train import platform

platform.setup()  # before megatron: it binds torch.cuda names at import

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group  # noqa: E402

from rexmoe_train.model.reuse import ReuseGroup  # noqa: E402
from rexmoe_train.parallel.placement import ExpertPlacement  # noqa: E402


class ExpertBank(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection, *,
                 group: ReuseGroup, placement: ExpertPlacement, num_moe_layers: int) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        assert num_local_experts == placement.local_slots
        self.group = group
        self.placement = placement
        self.num_moe_layers = num_moe_layers

    def slot_identity(self, slot: int) -> tuple[int, int]:
        """Local slot -> (owner MoE layer, expert index) on this EP rank."""
        owner, expert = self.placement.slot_owner_expert(self.ep_group.rank(), slot)
        return self.group.first_moe_layer + owner, expert

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, checkpoint_prefix=None):
        """``prefix`` names the local module path; ``checkpoint_prefix`` the layout-free key."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        checkpoint_prefix = f"{prefix}experts." if checkpoint_prefix is None else checkpoint_prefix
        out = {}
        for slot, expert in enumerate(self.local_experts):
            owner_layer, expert_idx = self.slot_identity(slot)
            local_prefix = f"{prefix}local_experts.{slot}."
            offsets = (
                *sharded_offsets,
                (len(sharded_offsets), owner_layer, self.num_moe_layers),
                (len(sharded_offsets) + 1, expert_idx, self.placement.experts_per_layer),
            )
            expert_sd = expert.sharded_state_dict(local_prefix, offsets, metadata)
            replace_prefix_for_sharding(expert_sd, local_prefix, checkpoint_prefix)
            for tensor in expert_sd.values():
                # replicated along expert-data-parallel ranks only
                tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())
            out.update(expert_sd)
        return out


class ExpertBanks(MegatronModule):
    """The banks of the reuse groups of one model chunk, registered once on the model."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.banks = torch.nn.ModuleDict()

    def get_or_build(self, group: ReuseGroup, build: Callable[[], ExpertBank]) -> ExpertBank:
        key = str(group.index)
        if key not in self.banks:
            self.banks[key] = build()
        return self.banks[key]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for key, bank in self.banks.items():
            out.update(bank.sharded_state_dict(f"{prefix}banks.{key}.", sharded_offsets, metadata,
                                               checkpoint_prefix=f"{prefix}experts."))
        return out
