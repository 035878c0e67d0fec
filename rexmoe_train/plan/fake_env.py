"""The fake world one simulated rank runs in: torch's fake process group, fake tensors, and the few
narrow patches megatron needs where it reads values on the host.

Everything here is installed by :func:`simulation_patches` (a context manager that restores every
patched attribute on exit) and never touches a training code path: a real run never enters it.

What each patch is for:
  * ``RealWhenAllReal``: a dispatch mode above FakeTensorMode that runs an op for real when none of
    its tensor inputs is fake: host-side bookkeeping (RNG state checks, PSR masks, split sizes made
    from the synthetic load) keeps real values while every model tensor stays fake. A host read of
    a fake value (``.item()``) is refused, except in the optimizer step (grad norm, found-inf: values
    that decide no shape), where it answers 1.0 / 0 and is counted.
  * process groups: megatron's gloo side groups become fake groups; ``all_gather_object`` returns
    this rank's object for every rank (under a balanced load every rank's is the same).
  * the alltoall dispatcher: the routing map it sees is the synthetic load's (real), the EP gather
    of token counts returns the load's global counts (every source rank alike), and ``permute``
    makes a permutation of the right size without ``masked_select`` on fake values.
  * ``torch.utils.swap_tensors`` falls back to a data swap for fake parameters (``.to()``,
    ``.bfloat16()``: FakeTensorMode keeps a weak reference to each fake tensor, which a swap refuses).
  * the rexmoe_dedup dispatcher: the same synthetic routing map; its row layout (which token goes
    to which rank once) is computed for real from it, the received pairs are the load's.
  * ``--spec te``: megatron's local ``DotProductAttention`` runs torch's fused
    ``scaled_dot_product_attention`` (flash-style: no [b, heads, s, s] scores kept), as TE's fused
    attention would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rexmoe_train.plan import load as load_lib


class HostReadError(RuntimeError):
    """A value of a fake tensor was read on the host where it could decide a shape."""


@dataclass
class HostReads:
    """Host reads of fake values answered with a stand-in (only inside the optimizer step)."""

    allowed: bool = False
    answered: int = 0


class RealWhenAllReal(TorchDispatchMode):
    """Runs ops whose tensor inputs are all real for real (see the module docstring)."""

    def __init__(self, host_reads: HostReads) -> None:
        super().__init__()
        self.host_reads = host_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(a, FakeTensor) for a in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            if not self.host_reads.allowed:
                raise HostReadError("a fake tensor's value was read on the host outside the optimizer "
                                    "step; the simulation cannot tell its value")
            self.host_reads.answered += 1
            dtype = args[0].dtype
            return 1.0 if dtype.is_floating_point else (False if dtype == torch.bool else 0)
        if func.namespace == "c10d" and func in _NO_FAKE_KERNEL:
            return _fake_collective_result(func, args)
        return func(*args, **kwargs)


# c10d's coalesced collectives (megatron DDP's grad reduce-scatter / all-gather / all-reduce through
# torch's coalescing manager) have no fake-tensor kernel: nothing to compute on fake tensors, so they
# return their in-place outputs and a completed work object, as the fake process group would.
_NO_FAKE_KERNEL = {
    torch.ops.c10d.allreduce_coalesced_.default,
    torch.ops.c10d.reduce_scatter_tensor_coalesced_.default,
    torch.ops.c10d.allgather_into_tensor_coalesced_.default,
    torch.ops.c10d.allgather_coalesced_.default,
}


def _fake_collective_result(func, args):
    from torch._C._distributed_c10d import FakeWork

    outs = []
    for ret in func._schema.returns:
        kind = str(ret.type)
        if "Work" in kind:
            outs.append(FakeWork().boxed())
        else:
            outs.append(args[0])
    return outs[0] if len(outs) == 1 else tuple(outs)


# -------------------------------------------------------------------------------------------------
@dataclass
class DispatchLoad:
    """What the alltoall dispatcher patches need: the load and where this rank sits."""

    load: load_lib.RoutingLoad
    seed: int = 0
    # per dispatcher id: the per-column counts [E] every source rank sends (alltoall), or the
    # assignments each local expert receives from all sources (rexmoe_dedup)
    global_counts: dict = field(default_factory=dict)
    pending_pairs: Optional[np.ndarray] = None  # rexmoe_dedup: the next dispatch_postprocess's counts


_ACTIVE: Optional[DispatchLoad] = None


def _available_physical(router) -> np.ndarray:
    """The router's PSR-available candidates this step, as bool [r*N] in physical column order."""
    with unset_fake_temporarily():
        host = router.available_mask().host.numpy()
    placement = router.placement
    physical = np.zeros(len(host), dtype=bool)
    for candidate, open_ in enumerate(host):
        physical[placement.physical_id(candidate) if not placement.is_identity else candidate] = open_
    return physical


def _synthetic_counts(dispatcher, tokens: int) -> np.ndarray:
    router = dispatcher._plan_router
    config = dispatcher.config
    available = _available_physical(router)
    # the simulated rank holds the hot column: its first local column
    hot = dispatcher.local_expert_indices[0]
    return load_lib.column_counts(tokens, config.moe_router_topk, available, _ACTIVE.load, hot,
                                  config.moe_expert_capacity_factor)


def _patched_preprocess(original: Callable) -> Callable:
    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens = routing_map.shape[0]
        counts = _synthetic_counts(self, tokens)
        _ACTIVE.global_counts[id(self)] = counts
        with unset_fake_temporarily():
            real_map = torch.from_numpy(load_lib.routing_map(tokens, counts, _ACTIVE.seed))
        return original(self, real_map)

    return preprocess


def _patched_gather(original: Callable) -> Callable:
    """megatron's EP all-gather of per-expert token counts: issue the collective on a fake copy (so
    its traffic is recorded) and return the load's global counts, every source rank alike."""

    def gather(input_, *args, **kwargs):
        if isinstance(input_, FakeTensor):
            return original(input_, *args, **kwargs)
        group = kwargs.get("group")
        size = group.size() if group is not None else 1
        original(torch.empty(input_.shape, dtype=input_.dtype), *args, **kwargs)
        with unset_fake_temporarily():
            return input_.repeat(size)

    return gather


def _permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    """megatron's permute with the output size known (num_out_tokens): same allocations, no
    masked_select on fake values. The order of the rows is irrelevant to a fake step."""
    count = int(num_out_tokens) if num_out_tokens is not None else int(routing_map.sum())
    sorted_indices = torch.zeros(count, dtype=torch.long, device=tokens.device)
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.T.contiguous().reshape(-1).index_select(0, sorted_indices)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


# -- the rexmoe_dedup dispatcher -----------------------------------------------------------------
def _dedup_permute(hidden, routing_map, probs, ep, width, impl="auto"):
    """dedup_permute with the synthetic (real) routing map: the row layout is computed for real, the
    rows and gates are fake tensors of the sizes the real kernel makes."""
    from rexmoe_train.kernels.dedup_permute import DedupPermuted, dedup_layout

    with unset_fake_temporarily():
        row_of, tokens, rows_per_rank = dedup_layout(routing_map, ep)
        slots = torch.zeros((tokens.shape[0], width), dtype=torch.long)
    count = int(rows_per_rank.sum())
    index = torch.zeros(count, dtype=torch.long, device=hidden.device)
    rows = hidden.index_select(0, index)
    gates = probs.reshape(-1).index_select(0, torch.zeros(count * width, dtype=torch.long)).reshape(count, width)
    return DedupPermuted(rows=rows, gates=gates, slots=slots, tokens=tokens, rows_per_rank=rows_per_rank,
                         row_of=row_of)


def _patched_dedup_preprocess(original: Callable) -> Callable:
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        tokens = routing_map.shape[0]
        counts = _synthetic_counts(self, tokens)
        with unset_fake_temporarily():
            real_map = torch.from_numpy(load_lib.routing_map(tokens, counts, _ACTIVE.seed))
        out = original(self, hidden_states, real_map, probs)
        # the split exchange ran on the fake group (its output is unwritten): every source rank
        # sends this rank what this rank sends itself (the load is the same from every source)
        mine = self.input_splits[self.ep_rank]
        self.output_splits = [mine] * self.ep_size
        local = counts.reshape(self.ep_size, -1)[self.ep_rank]
        _ACTIVE.global_counts[id(self)] = local * self.ep_size
        return out

    return dispatch_preprocess


def _patched_dedup_postprocess(original: Callable) -> Callable:
    def dispatch_postprocess(self, rows, meta):
        _ACTIVE.pending_pairs = _ACTIVE.global_counts[id(self)]
        return original(self, rows, meta)

    return dispatch_postprocess


def _expand_pairs(slots, num_local):
    """The received (row, slot) pairs of the synthetic load: as many as the local experts receive."""
    from rexmoe_train.parallel.dispatcher import ExpandedPairs

    counts = _ACTIVE.pending_pairs
    pairs = int(counts.sum())
    with unset_fake_temporarily():
        tokens_per_expert = torch.from_numpy(np.asarray(counts, dtype=np.int64))
    index = torch.zeros(pairs, dtype=torch.long, device=slots.device)
    return ExpandedPairs(rows=index, flat=index.clone(), tokens_per_expert=tokens_per_expert)


def real_chunk_orders(dispatchers) -> None:
    """The dispatcher's chunk sort orders are index lists it reads on the host: make them real."""
    with unset_fake_temporarily():
        for d in dispatchers:
            if not hasattr(d, "sort_input_by_local_experts"):
                continue
            idx = torch.arange(d.num_experts * d.tp_size)
            d.sort_input_by_local_experts = idx.reshape(-1, d.num_local_experts).T.ravel()
            d.restore_output_by_local_experts = idx.reshape(d.num_local_experts, -1).T.ravel()


# -------------------------------------------------------------------------------------------------
def _fused_core_attention(self, query, key, value, attention_mask, attn_mask_type=None,
                          attention_bias=None, packed_seq_params=None):
    """Flash-style causal attention for megatron's local DotProductAttention signature:
    [s, b, heads, d] in, [s, b, heads * d] out; keeps no [b, heads, s, s] scores."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    s, b = query.shape[0], query.shape[1]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's torch fallback of amp_C.multi_tensor_l2norm builds its result with torch.tensor()
    from the per-tensor norms (a host read); the same norms, kept on the device."""
    norms = [torch.linalg.vector_norm(t) for tensors in tensor_lists for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return total.reshape(1).float(), None


# -------------------------------------------------------------------------------------------------
class _Patcher:
    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)
        self.saved.clear()


def _all_gather_object(object_list, obj, group=None):
    for i in range(len(object_list)):
        object_list[i] = obj


def _broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    return None


@contextlib.contextmanager
def simulation_patches(dispatch_load: DispatchLoad, fused_attention: bool):
    """Install the patches (module docstring) for one simulated rank; restore them on exit."""
    global _ACTIVE
    from megatron.core import parallel_state
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer import dot_product_attention
    from megatron.core.transformer.moe import token_dispatcher

    from rexmoe_train.core import psr
    from rexmoe_train.parallel import dispatcher as dedup_dispatcher

    patcher = _Patcher()
    original_create_group = parallel_state.create_group

    def create_group(ranks=None, timeout=None, backend=None, *args, **kwargs):
        return original_create_group(ranks, timeout, None if backend == "gloo" else backend, *args, **kwargs)

    original_allowed = psr.PSRState.allowed

    def allowed(self, *args, **kwargs):  # the PSR mask is host data: compute it for real
        with unset_fake_temporarily():
            return original_allowed(self, *args, **kwargs)

    original_swap = torch.utils.swap_tensors

    def swap_tensors(t1, t2):
        # nn.Module._apply (.to(), .bfloat16()) swaps a fake parameter for its converted copy, which
        # fails on the weak reference FakeTensorMode holds to every fake tensor; the data swap is
        # what the conversion needs
        try:
            return original_swap(t1, t2)
        except RuntimeError:
            if not isinstance(t1, FakeTensor):
                raise
            t1.data = t2.data

    cls = token_dispatcher.MoEAlltoAllTokenDispatcher
    patcher.set(parallel_state, "create_group", create_group)
    patcher.set(psr.PSRState, "allowed", allowed)
    patcher.set(torch.utils, "swap_tensors", swap_tensors)
    patcher.set(dist, "all_gather_object", _all_gather_object)
    patcher.set(dist, "broadcast_object_list", _broadcast_object_list)
    patcher.set(cls, "preprocess", _patched_preprocess(cls.preprocess))
    patcher.set(token_dispatcher, "gather_from_sequence_parallel_region",
                _patched_gather(token_dispatcher.gather_from_sequence_parallel_region))
    patcher.set(token_dispatcher, "permute", _permute)
    dedup = dedup_dispatcher.DedupAllToAllDispatcher
    patcher.set(dedup, "dispatch_preprocess", _patched_dedup_preprocess(dedup.dispatch_preprocess))
    patcher.set(dedup, "dispatch_postprocess", _patched_dedup_postprocess(dedup.dispatch_postprocess))
    patcher.set(dedup_dispatcher, "dedup_permute", _dedup_permute)
    patcher.set(dedup_dispatcher, "expand_pairs", _expand_pairs)
    if getattr(getattr(clip_grads, "l2_norm_impl", None), "__name__", "") == "local_multi_tensor_l2_norm":
        patcher.set(clip_grads, "l2_norm_impl", _l2_norm)
    if fused_attention:
        patcher.set(dot_product_attention.DotProductAttention, "forward", _fused_core_attention)
    _ACTIVE = dispatch_load
    try:
        yield
    finally:
        _ACTIVE = None
        patcher.restore()
