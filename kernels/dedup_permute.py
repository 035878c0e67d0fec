"""Dedup permute / unpermute: one row per (token, destination EP rank), and its inverse.

A deduplicating dispatcher sends a token once to each EP rank that holds at least one of its chosen
experts, with the chosen local slots and gate values of that rank attached, instead of once per
chosen expert. These are the two data-movement steps on the SOURCE rank around the all-to-all:

* :func:`dedup_permute` (before dispatch): ``hidden [T, H]`` + ``routing_map/probs [T, ep*L]`` in
  physical expert order (rank q owns columns ``[q*L, (q+1)*L)``) -> ``rows [R, H]`` grouped by
  destination rank (rank-major, token-minor: exactly the ``all_to_all_single`` send order with
  ``input_splits = rows_per_rank``), plus per row its source token, its first ``width`` chosen local
  slots on that rank in ascending slot order (padding: slot -1, gate 0) and their gates.
* :func:`dedup_unpermute` (after combine): ``rows [R, H]`` coming back (each already the gate-weighted
  sum of that token's expert outputs on that rank) -> ``[T, H]``: every token sums its rows over ranks.

Why the unpermute is a gather, not a scatter: it walks the inverse map ``row_of [T, ep]`` (row of
(token, rank), -1 if none) and each program owns whole output rows, so there are no atomics, the
summation order is fixed (ascending rank, fp32 accumulation) and the result is bit-reproducible;
every output element is written (a token with no rows gets zeros).

The row layout (``row_of``, ``rows_per_rank``) is an exclusive scan over the [T, ep] "token uses
rank" mask. It is computed with torch in both implementations: it is O(T*ep) integers next to the
O(R*H) activation bytes the kernels move, and the host needs ``rows_per_rank`` anyway (split sizes).

Backward: permute's backward is an unpermute of the row gradients (and a scatter of the gate
gradients into ``probs``); unpermute's backward is a row gather. Both are wired with
``torch.autograd.Function`` so the Triton forward is trainable.

How the dedup dispatcher (rexmoe_train/parallel/dispatcher.py) calls these, replacing its torch code:
``dispatch_preprocess``: ``p = dedup_permute(hidden, routing_map, probs, ep, width)``; send
``p.rows`` with ``input_splits = p.rows_per_rank.tolist()``, meta from ``p.gates``/``p.slots``
(identical to its ``pack_rows`` output: same row order, same slot order, same padding).
``combine_postprocess``: ``dedup_unpermute(rows, p.row_of)`` instead of the ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rexmoe_train.kernels._triton import empty, jit, next_pow2, tl, triton, use_triton

__all__ = ["DedupPermuted", "dedup_layout", "dedup_permute", "dedup_unpermute", "dense_from_topk",
           "dedup_permute_reference", "dedup_unpermute_reference"]


@dataclass
class DedupPermuted:
    rows: torch.Tensor  # [R, H] hidden dtype, rank-major then token order
    gates: torch.Tensor  # [R, W] probs dtype, 0 in padding
    slots: torch.Tensor  # long [R, W], local slot on the destination rank, -1 in padding
    tokens: torch.Tensor  # long [R], source token of each row
    rows_per_rank: torch.Tensor  # long [ep], the all-to-all input splits
    row_of: torch.Tensor  # long [T, ep], row of (token, rank) or -1: what unpermute walks


# --------------------------------------------------------------------------------------------------
# Layout (shared by both implementations)
# --------------------------------------------------------------------------------------------------
def dedup_layout(routing_map: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """routing_map bool [T, ep*L] -> (row_of long [T, ep], tokens long [R], rows_per_rank long [ep])."""
    tokens_n, experts = routing_map.shape
    if experts % ep:
        raise ValueError(f"routing_map has {experts} expert columns, not divisible by ep={ep}")
    row_of, flat, rows_per_rank = _rows_layout(routing_map, ep)
    tokens = flat.nonzero(as_tuple=True)[0] % max(tokens_n, 1)  # data-dependent size: a host sync
    return row_of, tokens, rows_per_rank


def _rows_layout(routing_map: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_of [T, ep], the rank-major flat use mask [ep*T], rows_per_rank [ep]): no host sync."""
    tokens_n, experts = routing_map.shape
    uses = routing_map.reshape(tokens_n, ep, experts // ep).any(dim=-1)  # [T, ep]
    flat = uses.t().reshape(-1)  # rank-major: the send order
    row_index = torch.cumsum(flat.long(), 0) - 1
    row_of = torch.where(flat, row_index, torch.full_like(row_index, -1)).view(ep, tokens_n).t()
    return row_of.contiguous(), flat, uses.sum(dim=0)


def dense_from_topk(indices: torch.Tensor, values: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (``indices`` long [T, k] in physical order, ``values`` [T, k]) -> the (routing_map bool,
    probs) [T, E] pair the permute takes; e.g. from ``fused_router(..., dense=False)`` after
    ``placement``'s candidate -> physical index map. Differentiable in ``values``."""
    tokens_n = indices.shape[0]
    routing_map = torch.zeros((tokens_n, num_experts), dtype=torch.bool, device=indices.device)
    routing_map.scatter_(1, indices, True)
    probs = values.new_zeros((tokens_n, num_experts)).scatter(1, indices, values)
    return routing_map, probs


# --------------------------------------------------------------------------------------------------
# Torch references (CPU path and test oracle)
# --------------------------------------------------------------------------------------------------
def dedup_permute_reference(hidden: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor,
                            ep: int, width: int) -> DedupPermuted:
    tokens_n, experts = routing_map.shape
    local = experts // ep
    row_of, tokens, rows_per_rank = dedup_layout(routing_map, ep)
    ranks = torch.repeat_interleave(torch.arange(ep, device=hidden.device), rows_per_rank,
                                    output_size=tokens.numel())
    chosen = routing_map.reshape(tokens_n, ep, local)[tokens, ranks]  # [R, L]
    # stable sort moves the chosen slots to the front in ascending slot order
    order = torch.sort(chosen.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = chosen.gather(1, order)
    gates = probs.reshape(tokens_n, ep, local)[tokens, ranks].gather(1, order)
    gates = torch.where(valid, gates, torch.zeros_like(gates))
    slots = torch.where(valid, order, torch.full_like(order, -1))
    return DedupPermuted(hidden.index_select(0, tokens), gates, slots, tokens, rows_per_rank, row_of)


def dedup_unpermute_reference(rows: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """Sum each token's rows over ranks in ascending rank order, accumulating in fp32."""
    tokens_n, ep = row_of.shape
    out = torch.zeros((tokens_n, rows.shape[-1]), dtype=torch.float32, device=rows.device)
    for q in range(ep):
        present = row_of[:, q] >= 0
        idx = present.nonzero(as_tuple=True)[0]
        out = out.index_add(0, idx, rows.index_select(0, row_of[idx, q]).float())
    return out.to(rows.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@jit
def _permute_kernel(hidden_ptr, map_ptr, probs_ptr, row_of_ptr,
                    rows_ptr, gates_ptr, slots_ptr, tokens_ptr,
                    T, H, EP, E, L,
                    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    # One program: BLOCK_T tokens x one destination rank q.
    pid_t = tl.program_id(0)
    q = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    row = tl.load(row_of_ptr + t.to(tl.int64) * EP + q, mask=t_ok, other=-1)
    has_row = row >= 0
    row64 = tl.where(has_row, row, 0).to(tl.int64)
    tl.store(tokens_ptr + row64, t.to(tl.int64), mask=has_row)

    # Local slots of rank q: compact the chosen ones to the front (ascending) with a prefix count.
    lcol = tl.arange(0, BLOCK_L)
    tile_ok = has_row[:, None] & (lcol[None, :] < L)
    col = t.to(tl.int64)[:, None] * E + q * L + lcol[None, :]
    chosen = tl.load(map_ptr + col, mask=tile_ok, other=0).to(tl.int32)
    gate = tl.load(probs_ptr + col, mask=tile_ok, other=0.0)
    position = tl.cumsum(chosen, axis=1) - 1
    for w in tl.static_range(W):
        pick = (chosen > 0) & (position == w)
        found = tl.sum(pick.to(tl.int32), axis=1) > 0
        slot = tl.sum(tl.where(pick, lcol[None, :], 0), axis=1)
        g = tl.sum(tl.where(pick, gate, tl.zeros_like(gate)), axis=1)
        tl.store(slots_ptr + row64 * W + w, tl.where(found, slot, -1).to(tl.int64), mask=has_row)
        tl.store(gates_ptr + row64 * W + w, g.to(gates_ptr.dtype.element_ty), mask=has_row)

    # The row itself: copy the token's hidden vector, BLOCK_H columns at a time.
    h = tl.arange(0, BLOCK_H)
    src = hidden_ptr + t.to(tl.int64)[:, None] * H
    dst = rows_ptr + row64[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        m = has_row[:, None] & ((h0 + h)[None, :] < H)
        tl.store(dst + h0 + h[None, :], tl.load(src + h0 + h[None, :], mask=m), mask=m)


@jit
def _unpermute_kernel(rows_ptr, row_of_ptr, out_ptr, T, H, EP,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program: a [BLOCK_T, BLOCK_H] tile of the output, summed over ranks in ascending order.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    h_ok = h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for q in range(0, EP):
        row = tl.load(row_of_ptr + t.to(tl.int64) * EP + q, mask=t_ok, other=-1)
        m = (row >= 0)[:, None] & h_ok[None, :]
        ptr = rows_ptr + tl.where(row >= 0, row, 0).to(tl.int64)[:, None] * H + h[None, :]
        acc += tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    out = out_ptr + t.to(tl.int64)[:, None] * H + h[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])


def _launch_permute(hidden, routing_map, probs, row_of, num_rows, ep, width):
    tokens_n, hid = hidden.shape
    experts = routing_map.shape[1]
    local = experts // ep
    dev = hidden.device
    rows = empty((num_rows, hid), hidden.dtype, dev)
    gates = empty((num_rows, width), probs.dtype, dev)
    slots = empty((num_rows, width), torch.long, dev)
    tokens = empty((num_rows,), torch.long, dev)
    block_t = 16
    grid = (triton.cdiv(tokens_n, block_t), ep)
    if tokens_n and num_rows:
        _permute_kernel[grid](
            hidden, routing_map.view(torch.uint8), probs, row_of, rows, gates, slots, tokens,
            tokens_n, hid, ep, experts, local, W=width, BLOCK_T=block_t,
            BLOCK_L=next_pow2(local), BLOCK_H=min(256, next_pow2(hid)))
    return rows, gates, slots, tokens


def _launch_unpermute(rows, row_of):
    tokens_n, ep = row_of.shape
    hid = rows.shape[-1]
    out = empty((tokens_n, hid), rows.dtype, rows.device)
    block_t, block_h = 16, min(128, next_pow2(hid))
    if tokens_n:
        grid = (triton.cdiv(tokens_n, block_t), triton.cdiv(hid, block_h))
        _unpermute_kernel[grid](rows, row_of, out, tokens_n, hid, ep, BLOCK_T=block_t, BLOCK_H=block_h)
    return out


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, probs, routing_map, row_of, num_rows, ep, width):
        rows, gates, slots, tokens = _launch_permute(hidden, routing_map, probs, row_of, num_rows,
                                                     ep, width)
        ctx.save_for_backward(row_of, slots, tokens)
        ctx.probs_shape = probs.shape
        ctx.mark_non_differentiable(slots, tokens)
        return rows, gates, slots, tokens

    @staticmethod
    def backward(ctx, grad_rows, grad_gates, _grad_slots, _grad_tokens):
        row_of, slots, tokens = ctx.saved_tensors
        grad_hidden = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_hidden = _launch_unpermute(grad_rows.contiguous(), row_of)
        if ctx.needs_input_grad[1]:
            tokens_n, experts = ctx.probs_shape
            ep = row_of.shape[1]
            # sizes known on the host (tokens has one entry per row), no boolean-mask indexing: no
            # host sync in the backward; padding slots add an exact 0 to their row's first column
            ranks = torch.repeat_interleave(torch.arange(ep, device=row_of.device),
                                            (row_of >= 0).sum(dim=0), output_size=tokens.numel())
            valid = slots >= 0
            col = ranks[:, None] * (experts // ep) + slots.clamp(min=0)
            flat = (tokens[:, None] * experts + col).reshape(-1)
            values = torch.where(valid, grad_gates, torch.zeros_like(grad_gates)).reshape(-1)
            grad_probs = grad_gates.new_zeros(tokens_n * experts)
            grad_probs = grad_probs.index_add(0, flat, values).view(tokens_n, experts)
        return grad_hidden, grad_probs, None, None, None, None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, row_of, tokens):
        ctx.save_for_backward(tokens)
        return _launch_unpermute(rows, row_of)

    @staticmethod
    def backward(ctx, grad_out):
        (tokens,) = ctx.saved_tensors
        return grad_out.index_select(0, tokens), None, None


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def dedup_permute(hidden: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, ep: int,
                  width: int, impl: str = "auto") -> DedupPermuted:
    """See the module docstring. ``width`` = slots kept per row (the dispatcher's min(topk, L))."""
    if routing_map.dtype != torch.bool or routing_map.shape != probs.shape:
        raise ValueError("routing_map must be bool and the same shape as probs")
    if hidden.shape[0] != routing_map.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens, routing_map {routing_map.shape[0]}")
    if not use_triton(impl):
        return dedup_permute_reference(hidden, routing_map, probs, ep, width)
    row_of, _, rows_per_rank = _rows_layout(routing_map, ep)  # the kernel finds the tokens itself
    num_rows = int(rows_per_rank.sum())  # THE host sync: the caller needs the splits on host anyway
    rows, gates, slots, tokens = _PermuteFn.apply(hidden.contiguous(), probs.contiguous(),
                                                  routing_map.contiguous(), row_of, num_rows, ep, width)
    return DedupPermuted(rows, gates, slots, tokens, rows_per_rank, row_of)


def dedup_unpermute(rows: torch.Tensor, row_of: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """rows [R, H] (one per (token, rank), already gate-weighted) -> [T, H] summed per token."""
    if not use_triton(impl):
        return dedup_unpermute_reference(rows, row_of)
    present = row_of >= 0
    # rank-major order = row order; the count is rows.shape[0], known on the host: no sync
    # (CUDA from torch 2.6; before 2.9 it crashed on an empty input: no rows, no call)
    tokens = torch.nonzero_static(present.t(), size=rows.shape[0])[:, 1] if rows.shape[0] else \
        torch.zeros(0, dtype=torch.long, device=rows.device)
    return _UnpermuteFn.apply(rows.contiguous(), row_of.contiguous(), tokens)

