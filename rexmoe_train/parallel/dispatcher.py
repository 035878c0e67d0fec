"""DedupAllToAllDispatcher: send each token once per destination EP rank, not once per chosen expert.

megatron's ``alltoall`` dispatcher sends one copy of a token per (token, chosen expert). With top-k of
r*N candidates spread over ep ranks (L = r*N/ep local slots each), a token's k experts often share a
rank, so most copies carry the same hidden vector to the same place. This dispatcher sends one row per
(token, destination rank) and lets the expert rank expand it into (token, slot) pairs locally.

Wire format (forward, ``all_to_all_single`` with uneven splits over the EP group; rows are ordered by
destination rank, then by token index on the source rank):

* split sizes: one int64 per rank (rows this rank sends each rank), exchanged first.
* ``hidden``: [rows, H] in the activation dtype — one row per (token, destination rank).
* ``meta``:   [rows, 2W] float32, W = min(topk, L): the token's chosen local slots on that rank and
  their gate values, padded to W entries (slot -1, gate 0). Columns [0, W) hold the gates, [W, 2W)
  the slot ids as floats (exact below 2**24). One fp32 tensor instead of a gate tensor plus an int
  tensor: one collective fewer, and the gate keeps full precision whatever the activation dtype. A
  top-W list beats an [rows, L] mask as soon as L > W, which is the ReXMoE case (L = r*N/ep).

The expert rank groups the (row, slot) pairs by slot for megatron's SequentialMLP, whose expert MLP
multiplies by the gate (``permuted_probs``: megatron's contract, kept). Before the combine
all-to-all it sums the weighted expert outputs of each received row (one row per (token, rank) goes
back, [rows, H] in the activation dtype); the source rank sums the rows of a token over ranks.

Bytes per forward call on rank p (what crosses to OTHER ranks; the self chunk is a local copy and not
counted; s_h = activation element size, E = r*N physical experts):

    dispatch_p = 8*(ep-1) + sum_{q != p} rows(p->q) * (H*s_h + 8*W)
    combine_p  = sum_{q != p} rows(q->p) * H*s_h
    rows(p->q) = #{tokens t of rank p : t chose at least one expert on rank q}

megatron's stock alltoall for the same routing (its count all-gather, then one copy per expert):

    stock_dispatch_p = 8*E*(ep-1) + sum_{q != p} copies(p->q) * (H*s_h + s_p)
    stock_combine_p  = sum_{q != p} copies(q->p) * H*s_h

with s_p = the router probs' element size. Only the forward pass is counted; backward sends the
mirror image (the same rows; in the dispatch direction H*s_h, in the combine direction H*s_h + 8*W).

Scope: dropless, no expert tensor parallelism, no shared-expert overlap; those raise ValueError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from rexmoe_train import platform
from rexmoe_train.kernels.dedup_permute import DedupPermuted, dedup_permute, dedup_unpermute

#: the parallel.moe_token_dispatcher_type value that selects this dispatcher
DEDUP_DISPATCHER = "rexmoe_dedup"
#: index of each counter in DedupAllToAllDispatcher.counters
BYTE_COUNTERS = ("dispatch_bytes", "combine_bytes", "stock_dispatch_bytes", "stock_combine_bytes")
_META_DTYPE = torch.float32
_SPLIT_BYTES = 8  # int64 split sizes / expert counts


# --------------------------------------------------------------------------------------------------
# Pure helpers (no communication): tested against a naive reference in tests/parallel. The source
# rank's permute / unpermute are kernels/dedup_permute.py (Triton on a GPU, torch elsewhere).
# --------------------------------------------------------------------------------------------------
@dataclass
class ExpandedPairs:
    """Received rows expanded into (row, slot) pairs grouped by local slot (SequentialMLP order)."""

    rows: torch.Tensor  # long [pairs]: received row of each pair
    flat: torch.Tensor  # long [pairs]: index into the flattened [rows, W] meta
    tokens_per_expert: torch.Tensor  # long [L], CPU (SequentialMLP splits with .tolist())


def expand_pairs(slots: torch.Tensor, num_local: int) -> ExpandedPairs:
    """slots [rows, W] (-1 = padding) -> pairs sorted by slot, then by received row (stable)."""
    width = slots.shape[1]
    flat_slots = slots.reshape(-1)
    flat = (flat_slots >= 0).nonzero(as_tuple=True)[0]
    pair_slot = flat_slots[flat]
    order = torch.sort(pair_slot, stable=True).indices
    flat = flat[order]
    counts = torch.bincount(pair_slot, minlength=num_local)
    return ExpandedPairs(rows=torch.div(flat, width, rounding_mode="floor"), flat=flat,
                         tokens_per_expert=counts.cpu())


def reduce_rows(expert_output: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum the (already gate-weighted) expert outputs of each received row: [pairs, H] -> [rows, H]."""
    out = expert_output.new_zeros((num_rows, expert_output.shape[-1]))
    return out.index_add(0, rows, expert_output)


# --------------------------------------------------------------------------------------------------
class DedupAllToAllDispatcher(MoETokenDispatcher):
    """megatron's six-method dispatcher interface, one row per (token, EP rank) on the wire."""

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection=None, kernels: str = "auto") -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.kernels = kernels  # rexmoe.kernels: auto | torch | triton (kernels/dedup_permute.py)
        if config.moe_pad_expert_input_to_capacity:
            # capacity DROPPING happens in the router (ReXMoERouter) and needs nothing from a
            # dispatcher; padding every expert's input to its capacity would defeat the dedup
            raise ValueError("rexmoe_dedup dispatcher does not pad expert inputs to capacity "
                             "(moe_pad_expert_input_to_capacity); use alltoall")
        if self.tp_size > 1:
            raise ValueError("rexmoe_dedup dispatcher needs expert_tensor_parallel_size=1; use alltoall")
        if config.moe_shared_expert_overlap:
            raise ValueError("rexmoe_dedup dispatcher does not overlap shared experts; "
                             "set moe_shared_expert_overlap=false")
        expected = list(range(local_expert_indices[0], local_expert_indices[0] + num_local_experts))
        if list(local_expert_indices) != expected:
            raise ValueError("rexmoe_dedup dispatcher needs contiguous local expert indices")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.width = min(config.moe_router_topk, num_local_experts)
        self.ep_rank = self.ep_group.rank() if self.ep_size > 1 else 0
        # Forward bytes to other ranks since the last reset (see BYTE_COUNTERS); on the compute device
        # so counting never forces a host sync.
        self.counters = torch.zeros(len(BYTE_COUNTERS), dtype=torch.long, device=platform.device())
        # ReXMoELayer points this at its router: a recompute replay re-sends the same bytes, which
        # the step already counted in the first forward
        self.is_replay: Callable[[], bool] = lambda: False
        self._packed: Optional[DedupPermuted] = None
        self._pairs: Optional[ExpandedPairs] = None

    # -- byte accounting ---------------------------------------------------------------------------
    def reset_bytes(self) -> None:
        self.counters.zero_()

    @property
    def bytes_sent(self) -> dict[str, int]:
        """This rank's forward bytes since the last reset: {"dispatch", "combine", "stock_..."}."""
        values = self.counters.tolist()
        return {name.removesuffix("_bytes"): int(v) for name, v in zip(BYTE_COUNTERS, values)}

    # -- dispatch ----------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        assert routing_map.dtype == torch.bool and routing_map.dim() == 2 and probs.dim() == 2
        self.hidden_shape = hidden_states.shape
        self.probs_dtype = probs.dtype
        hidden = hidden_states.reshape(-1, self.hidden_shape[-1])
        self.num_tokens = hidden.shape[0]
        packed = dedup_permute(hidden, routing_map, probs, self.ep_size, self.width, impl=self.kernels)
        self._packed = packed
        # Split sizes must be host ints for all_to_all_single; exchange them now (one small a2a).
        send = packed.rows_per_rank
        if self.ep_size > 1:
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.ep_group)
        else:
            recv = send
        self.input_splits = send.tolist()
        self.output_splits = recv.tolist()
        meta = torch.cat([packed.gates.to(_META_DTYPE), packed.slots.to(_META_DTYPE)], dim=1)
        self._count_dispatch(hidden, probs, routing_map)
        return packed.rows, meta

    def _count_dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        if self.ep_size == 1 or self.is_replay():
            return
        # (token, expert) pairs per destination rank: what megatron's alltoall would send
        copies_per_rank = routing_map.reshape(routing_map.shape[0], self.ep_size, -1).sum(dim=(0, 2))
        remote = torch.ones(self.ep_size, dtype=torch.long, device=self.counters.device)
        remote[self.ep_rank] = 0
        row_bytes = hidden.shape[1] * hidden.element_size()
        meta_bytes = 2 * self.width * torch.finfo(_META_DTYPE).bits // 8
        remote_rows = sum(n for q, n in enumerate(self.input_splits) if q != self.ep_rank)
        self.counters[0] += _SPLIT_BYTES * (self.ep_size - 1) + remote_rows * (row_bytes + meta_bytes)
        self.counters[2] += _SPLIT_BYTES * self.num_experts * (self.ep_size - 1)
        self.counters[2] += (copies_per_rank.to(remote.device) * remote).sum() * (
            row_bytes + probs.element_size())
        self._row_bytes = row_bytes

    def token_dispatch(self, rows: torch.Tensor, meta: torch.Tensor):
        if self.ep_size == 1:
            return rows, meta
        rows = all_to_all(self.ep_group, rows, self.output_splits, self.input_splits)
        meta = all_to_all(self.ep_group, meta, self.output_splits, self.input_splits)
        return rows, meta

    def dispatch_postprocess(self, rows: torch.Tensor, meta: torch.Tensor):
        gates, slots = meta[:, : self.width], meta[:, self.width:].detach().long()
        pairs = expand_pairs(slots, self.num_local_experts)
        self._pairs = pairs
        self.num_received = rows.shape[0]
        self._count_received(slots)
        expert_input = rows.index_select(0, pairs.rows)
        permuted_probs = gates.reshape(-1).index_select(0, pairs.flat).to(self.probs_dtype)
        return expert_input, pairs.tokens_per_expert, permuted_probs

    def _count_received(self, slots: torch.Tensor) -> None:
        if self.ep_size == 1 or self.is_replay():
            return
        start = sum(self.output_splits[: self.ep_rank])
        own = range(start, start + self.output_splits[self.ep_rank])
        remote_rows = self.num_received - len(own)
        self.counters[1] += remote_rows * self._row_bytes
        remote_copies = (slots >= 0).sum() - (slots[own.start: own.stop] >= 0).sum()
        self.counters[3] += remote_copies * self._row_bytes

    # -- combine -----------------------------------------------------------------------------------
    def combine_preprocess(self, expert_output: torch.Tensor) -> torch.Tensor:
        # Reduce on the expert rank: one row per (token, rank) travels back, not one per expert.
        return reduce_rows(expert_output, self._pairs.rows, self.num_received)

    def token_combine(self, rows: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return rows
        return all_to_all(self.ep_group, rows, self.input_splits, self.output_splits)

    def combine_postprocess(self, rows: torch.Tensor) -> torch.Tensor:
        out = dedup_unpermute(rows, self._packed.row_of, impl=self.kernels)
        self._packed = self._pairs = None
        return out.view(self.hidden_shape)


def find_dedup_dispatchers(modules) -> list[DedupAllToAllDispatcher]:
    """The dedup dispatchers of the MoE layers under ``modules`` (model chunks), in module order."""
    found = []
    for module in modules:
        for sub in module.modules():
            dispatcher = getattr(sub, "token_dispatcher", None)
            if isinstance(dispatcher, DedupAllToAllDispatcher):
                found.append(dispatcher)
    return found
