"""Expert banks: the r*N experts of a reuse group, each stored once.

A bank is a megatron SequentialMLP over the group's local slots (r*N/ep on each EP rank, in the
placement's slot order), so the megatron expert MLPs, their `is_expert` gradient reduction over the
expert-data-parallel group, and the expert optimizer all apply unchanged. The banks are registered
once on the model (``GPTModel.expert_banks``), never inside a layer: the MoE layers hold plain,
unregistered references, so parameters, gradients and checkpoints see each expert exactly once.

Checkpoint keys are by (owner MoE layer, expert) — ``expert_banks.experts.<param>`` with global shape
[num_moe_layers, N, ...] — i.e. independent of r, of the placement and of the EP size, and the same
layout megatron uses for a vanilla model's per-layer experts.

On the Transformer Engine path (``model.transformer_impl``) the bank is a TEGroupedMLP instead
(``TEExpertBank``: grouped GEMMs, fp8-capable) with the same checkpoint keys; ``bank_class`` picks
the bank from the experts module of the layer spec.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

try:  # the TE bank's base class; megatron defines it without TE, guard anyway (older/newer mcore)
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
except ImportError:  # pragma: no cover - depends on the megatron build
    TEGroupedMLP = None

from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.reuse import ReuseGroup


class _GroupSlots:
    """What every bank knows about its reuse group: which (owner layer, expert) each local slot
    holds. Shared by the local and the Transformer Engine bank."""

    def _bind_group(self, num_local_experts: int, group: ReuseGroup, placement: ExpertPlacement,
                    num_moe_layers: int) -> None:
        assert num_local_experts == placement.local_slots
        self.group = group
        self.placement = placement
        self.num_moe_layers = num_moe_layers
        # Every expert weight belongs to megatron's expert grad buffer and optimizer, reduced over the
        # expert-data-parallel group. Megatron marks expert params `allreduce=True` when ep == 1,
        # which puts them in the dense buffer, reduced over the dense data-parallel group: wrong at
        # tp > 1 with expert_tensor_parallel_size=1, where each TP rank runs the (replicated) experts
        # on its own sequence-parallel share of the tokens and the replicas must sum their grads.
        for param in self.parameters():
            param.allreduce = False

    def slot_identity(self, slot: int) -> tuple[int, int]:
        """Local slot -> (owner MoE layer, expert index) on this EP rank."""
        owner, expert = self.placement.slot_owner_expert(self.ep_group.rank(), slot)
        return self.group.first_moe_layer + owner, expert


class ExpertBank(_GroupSlots, SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection, *,
                 group: ReuseGroup, placement: ExpertPlacement, num_moe_layers: int) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self._bind_group(num_local_experts, group, placement, num_moe_layers)

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


if TEGroupedMLP is not None:

    class TEExpertBank(_GroupSlots, TEGroupedMLP):
        """The bank on the Transformer Engine path: one TE GroupedLinear pair for all r*N/ep local
        slots (one grouped GEMM per projection instead of a Python loop over experts).

        Each slot is still ONE parameter pair (``linear_fc1.weight<slot>``...) that the r layers of
        the group call, i.e. each GroupedLinear runs r times per micro-batch forward. What TE does
        with that (TE 2.11 source, docs/gpu.md): under fp8 the weight is cast once per optimizer
        step, however many layers reuse it, only because megatron's schedule sets
        ``is_first_microbatch`` on the first micro-batch (the first of the r calls casts and caches,
        the other calls and micro-batches reuse the cache); with ``is_first_microbatch=None``
        (``disable_parameter_transpose_cache``, or a forward outside the schedule) every call casts,
        r times per micro-batch. Delayed scaling keeps one amax slot per GEMM for all r calls: the
        history records the max over the r layers' inputs, and one scale serves them all.
        ``gradient_accumulation_fusion`` is refused for r > 1 (see ``__init__``).

        Checkpoint keys and offsets are the local bank's (``experts.linear_fc1.weight`` over
        [num_moe_layers, N]), so checkpoints move between ``transformer_impl=local`` and
        ``transformer_engine``; TE's fp8 metadata (``_extra_state``) is saved per (group, EP rank),
        i.e. it does not survive an EP-size change. Not exercised in CI (TE needs a GPU)."""

        def __init__(self, num_local_experts, config, submodules, pg_collection, *,
                     group: ReuseGroup, placement: ExpertPlacement, num_moe_layers: int) -> None:
            # With fused wgrad accumulation TE writes a call's weight gradient straight into
            # main_grad, and a call made with is_first_microbatch=True OVERWRITES it instead of
            # adding (TE 2.11 grouped_linear.py:373-378, 419-420, 460-464). Here that call is the
            # group's first layer, whose backward runs last: it would discard the other r-1 layers'
            # gradients of the first micro-batch. Checked before building, so it fails without TE too.
            if getattr(config, "gradient_accumulation_fusion", False) and group.size > 1:
                raise ValueError(
                    f"reuse group {group.index} (r={group.size}) on the Transformer Engine bank cannot "
                    "use gradient_accumulation_fusion: TE would overwrite the gradient of the reused "
                    "experts on each step's first micro-batch (docs/gpu.md)")
            super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
            self._bind_group(num_local_experts, group, placement, num_moe_layers)
            self.expt_dp_group = pg_collection.expt_dp

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None,
                               checkpoint_prefix=None):
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            checkpoint_prefix = f"{prefix}experts." if checkpoint_prefix is None else checkpoint_prefix
            dp_rank = self.expt_dp_group.rank()
            out = {}
            for slot in range(self.num_local_experts):
                owner_layer, expert_idx = self.slot_identity(slot)
                offsets = (
                    *sharded_offsets,
                    (len(sharded_offsets), owner_layer, self.num_moe_layers),
                    (len(sharded_offsets) + 1, expert_idx, self.placement.experts_per_layer),
                )
                state = {"linear_fc1.weight": getattr(self.linear_fc1, f"weight{slot}"),
                         "linear_fc2.weight": getattr(self.linear_fc2, f"weight{slot}")}
                # fc1 is column-parallel (axis 0), fc2 row-parallel (axis 1): as SequentialMLP's MLPs
                sub = make_sharded_tensors_for_checkpoint(
                    state, "", {"linear_fc1.weight": 0, "linear_fc2.weight": 1}, offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
                if self.config.gated_linear_unit:
                    sub["linear_fc1.weight"] = apply_swiglu_sharded_factory(sub["linear_fc1.weight"],
                                                                            offsets)
                replace_prefix_for_sharding(sub, "", checkpoint_prefix)
                for name, tensor in sub.items():
                    tensor.replica_id = (*tensor.replica_id[:2], dp_rank)
                    module, param = name.split(".")
                    out[f"{prefix}{module}.{param}{slot}"] = tensor
            ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
            for module in ("linear_fc1", "linear_fc2"):
                extra = getattr(self, module).get_extra_state()
                out[f"{prefix}{module}._extra_state"] = ShardedObject(
                    f"{checkpoint_prefix}te_extra_state.group{self.group.index}.{module}", extra,
                    (ep_size,), (ep_rank,), (0, self.tp_group.rank(), dp_rank))
            return out
else:  # pragma: no cover
    TEExpertBank = None


def bank_class(experts_module) -> type:
    """The bank class for the experts module a layer spec asks for (TEGroupedMLP -> TEExpertBank)."""
    if TEGroupedMLP is not None and isinstance(experts_module, type) and issubclass(
            experts_module, TEGroupedMLP):
        return TEExpertBank
    return ExpertBank


class ExpertBanks(MegatronModule):
    """The banks of the reuse groups of one model chunk, registered once on the model."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.banks = torch.nn.ModuleDict()

    def add(self, group_index: int, bank: ExpertBank) -> None:
        self.banks[str(group_index)] = bank

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for key, bank in self.banks.items():
            out.update(bank.sharded_state_dict(f"{prefix}banks.{key}.", sharded_offsets, metadata,
                                               checkpoint_prefix=f"{prefix}experts."))
        return out
