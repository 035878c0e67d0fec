"""Fused router: logits [T, C] -> softmax -> PSR mask on the scores -> top-k, in one pass.

Exactly ``gate(logits, k, "softmax_then_topk", allowed, "scores")`` (core/gating.py, the paper's
gate): fp32 softmax over all C = r*N candidates, rounded to the logits dtype (gating.py's
``.type_as``), masked candidates' scores set to 0 (no renormalisation), then top-k. Why fuse: the
unfused path writes and re-reads several [T, C] tensors (softmax, masked copy, topk workspace, dense
scatter) while each row only needs k outputs; the kernel keeps a row tile in registers and writes the
k values/indices, plus the dense outputs only when the caller asks for them.

Ties: the kernel takes the LOWEST candidate index among equal scores (iterated argmax with a min-index
tie break), so it is deterministic. ``torch.topk`` does not document its tie order; the reference
(:func:`fused_router_reference`) therefore re-sorts gate()'s selection by (score desc, index asc). On
exact ties at the k-th place the two may pick different (equal-score) candidates; values agree.

Under the Triton INTERPRETER (CPU tests) fp32 -> bf16 casts truncate instead of rounding to nearest
(triton 3.9), so bf16 scores there can be one bf16 step below gate()'s; compiled kernels round like
torch.

The aux scores (balance losses) follow gating.py: renormalised over the available candidates when
a PSR mask is active.

Backward (wired with ``torch.autograd.Function``; recomputes the softmax in torch, which is cheap next
to the forward's memory traffic): d logits = s * (g - sum(s * g)), g = allowed * d scores, treating the
dtype rounding as identity like autograd does for ``.type_as``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from rexmoe_train.core.gating import AvailabilityMask, as_mask, gate
from rexmoe_train.kernels._triton import empty, jit, next_pow2, tl, triton, use_triton

__all__ = ["RouterOutput", "fused_router", "fused_router_reference"]


class RouterOutput(NamedTuple):
    values: torch.Tensor  # [T, k] logits dtype, descending, ties -> lower index first
    indices: torch.Tensor  # long [T, k]
    probs: Optional[torch.Tensor]  # [T, C] dense gate weights (0 off the top-k), if requested
    routing_map: Optional[torch.Tensor]  # bool [T, C], if requested
    aux_scores: Optional[torch.Tensor]  # fp32 [T, C] masked scores (balance losses), if requested


def fused_router_reference(logits: torch.Tensor, topk: int, allowed: Optional[torch.Tensor] = None,
                           dense: bool = True) -> RouterOutput:
    """A thin wrapper of gating.gate: sorts its top-k by (score desc, index asc)."""
    out = gate(logits, topk, "softmax_then_topk", allowed, "scores")
    key = out.probs.masked_fill(~out.routing_map, float("-inf"))
    indices = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :topk]
    values = out.probs.gather(1, indices)
    if not dense:
        return RouterOutput(values, indices, None, None, None)
    return RouterOutput(values, indices, out.probs, out.routing_map, out.aux_scores)


@jit
def _router_kernel(logits_ptr, allowed_ptr, values_ptr, indices_ptr, probs_ptr, map_ptr, aux_ptr,
                   T, C, RENORM_AUX, K: tl.constexpr, DENSE: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    # One program: BLOCK_T full rows (C <= BLOCK_C: a router row is r*N candidates, a few hundred).
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    t_ok = t < T
    c_ok = c < C
    tile_ok = t_ok[:, None] & c_ok[None, :]
    offs = t.to(tl.int64)[:, None] * C + c[None, :]
    x = tl.load(logits_ptr + offs, mask=tile_ok, other=float("-inf")).to(tl.float32)
    # fp32 softmax over ALL candidates (the mask applies to the scores, after the softmax)
    row_max = tl.max(x, axis=1)
    row_max = tl.where(t_ok, row_max, 0.0)  # rows past T are all -inf: keep them NaN-free
    e = tl.where(tile_ok, tl.exp(x - row_max[:, None]), 0.0)
    s = e / tl.where(t_ok, tl.sum(e, axis=1), 1.0)[:, None]
    # gating.py rounds the scores to the logits dtype before masking and top-k
    s = s.to(logits_ptr.dtype.element_ty).to(tl.float32)
    allowed = tl.load(allowed_ptr + c, mask=c_ok, other=0) != 0
    scores = tl.where(allowed[None, :], s, 0.0)
    work = tl.where(c_ok[None, :], scores, float("-inf"))  # padding columns are never picked
    picked = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.int1)
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        idx = tl.min(tl.where(work == best[:, None], c[None, :], BLOCK_C), axis=1)
        hit = c[None, :] == idx[:, None]
        picked = picked | hit
        work = tl.where(hit, float("-inf"), work)
        tl.store(values_ptr + t.to(tl.int64) * K + j, best.to(values_ptr.dtype.element_ty), mask=t_ok)
        tl.store(indices_ptr + t.to(tl.int64) * K + j, idx.to(tl.int64), mask=t_ok)
    if DENSE:
        tl.store(probs_ptr + offs, tl.where(picked, scores, 0.0).to(probs_ptr.dtype.element_ty),
                 mask=tile_ok)
        tl.store(map_ptr + offs, picked.to(tl.uint8), mask=tile_ok)
        # gating.py: under a PSR mask the balance-loss scores are a distribution over the available
        # candidates (renormalised); with nothing masked they are the scores as they are.
        total = tl.maximum(tl.sum(scores, axis=1), 1e-20)
        aux = tl.where(RENORM_AUX != 0, scores / total[:, None], scores)
        tl.store(aux_ptr + offs, aux, mask=tile_ok)


def _launch(logits: torch.Tensor, topk: int, allowed: torch.Tensor, renorm_aux: bool, dense: bool):
    """``allowed``: uint8 [C] on the logits' device; ``renorm_aux``: some candidate is masked (decided
    on the host: reading ``allowed.all()`` back here would stall the host every call)."""
    tokens_n, cands = logits.shape
    dev = logits.device
    values = empty((tokens_n, topk), logits.dtype, dev)
    indices = empty((tokens_n, topk), torch.long, dev)
    if dense:
        probs = empty((tokens_n, cands), logits.dtype, dev)
        routing = empty((tokens_n, cands), torch.uint8, dev)
        aux = empty((tokens_n, cands), torch.float32, dev)
    else:  # placeholders: never touched when DENSE is False
        probs, routing, aux = values, indices, values
    block_c = next_pow2(cands)
    # keep a program's tile around 4k elements: enough rows to amortise, small enough for registers
    block_t = max(1, min(64, 4096 // block_c))
    if tokens_n:
        _router_kernel[(triton.cdiv(tokens_n, block_t),)](
            logits, allowed, values, indices, probs, routing, aux, tokens_n, cands, int(renorm_aux),
            K=topk, DENSE=dense, BLOCK_T=block_t, BLOCK_C=block_c)
    if not dense:
        return values, indices, None, None, None
    return values, indices, probs, routing.view(torch.bool), aux


class _RouterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, allowed, renorm_aux, topk, dense):
        values, indices, probs, routing, aux = _launch(logits, topk, allowed, renorm_aux, dense)
        ctx.renorm_aux = renorm_aux
        ctx.save_for_backward(logits, allowed, indices)
        ctx.mark_non_differentiable(*(x for x in (indices, routing) if x is not None))
        return values, indices, probs, routing, aux

    @staticmethod
    def backward(ctx, d_values, _d_indices, d_probs, _d_map, d_aux):
        logits, allowed, indices = ctx.saved_tensors
        s = torch.softmax(logits, dim=-1, dtype=torch.float32)
        g = torch.zeros_like(s)
        if d_values is not None:
            g.scatter_add_(1, indices, d_values.float())
        if d_probs is not None:
            picked = torch.zeros_like(s, dtype=torch.bool).scatter(1, indices, True)
            g += torch.where(picked, d_probs.float(), 0.0)
        mask = allowed.to(g.device, g.dtype)
        if d_aux is not None:
            d_aux = d_aux.float()
            if ctx.renorm_aux:  # through aux = m*s / sum(m*s)
                masked = s * mask
                total = masked.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                d_aux = (d_aux - (d_aux * masked / total).sum(dim=-1, keepdim=True)) / total
            g += d_aux
        g = g * mask
        d_logits = s * (g - (s * g).sum(dim=-1, keepdim=True))
        return d_logits.to(logits.dtype), None, None, None, None


def fused_router(logits: torch.Tensor, topk: int,
                 allowed: Union[None, torch.Tensor, AvailabilityMask] = None,
                 dense: bool = True, impl: str = "auto") -> RouterOutput:
    """softmax_then_topk gating with the PSR mask on the scores; see the module docstring.

    ``allowed`` bool [C] on the host or an AvailabilityMask (None: all available; the router passes
    its cached AvailabilityMask, so the mask reaches the device once per step, not per call).
    ``dense``: also return probs, routing map and aux scores (what ReXMoERouter's balance losses
    need)."""
    cands = logits.shape[-1]
    if not 0 < topk <= cands:
        raise ValueError(f"topk={topk} must be in [1, {cands}]")
    if not use_triton(impl):
        return fused_router_reference(logits, topk, allowed, dense)
    mask = as_mask(allowed)
    if mask is None or mask.all:
        device_mask, renorm_aux = torch.ones(cands, dtype=torch.uint8, device=logits.device), False
    else:
        device_mask, renorm_aux = mask.on(logits.device, torch.uint8), True
    return RouterOutput(*_RouterFn.apply(logits.contiguous(), device_mask, renorm_aux, topk, dense))
