"""Gate functions: router logits (+ the PSR availability mask) -> top-k probabilities.

Pure tensor code in candidate order, shared by the router and the kernel tests' oracle. The three
gatings match megatron-core's `topk_routing_with_score_function` op for op when nothing is masked, so
r = 1 is exactly vanilla megatron MoE:

- ``softmax_then_topk`` (paper; megatron ``moe_router_pre_softmax=True``): softmax over all candidates,
  keep the top-k scores, no renormalisation.
- ``topk_then_softmax`` (megatron default): top-k logits, softmax over those k.
- ``sigmoid``: sigmoid scores, top-k, renormalised over the k when k > 1.

PSR masking (spec §3): ``mask_on="scores"`` zeroes masked candidates' post-softmax scores before
top-k (the paper: the kept scores are NOT renormalised over the available candidates);
``mask_on="logits"`` sets masked logits to -inf before the score function. For top-k-then-softmax the
two coincide (masked candidates are simply never selected).

``selection_bias`` (aux-loss-free balancing, [C] fp32) is added to the values the top-k is taken over
(the softmax scores, the logits, the sigmoid scores) for the CHOICE only; the gate values are the
unbiased ones (megatron's expert_bias for sigmoid, and the same rule for the two softmax gatings).
Masked candidates are excluded from the biased choice outright (a positive bias must not lift a
zeroed score back into the top-k).

The PSR mask is made on the host (core/psr.py). :class:`AvailabilityMask` keeps it there for every
decision (all available? how many?) and copies it to the device once, not once per call: each copy
from pageable memory, and each ``bool(mask.all())`` of a device copy, stalls the host until the
stream drains (tests/devicecheck/test_host_syncs.py counts them).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch


class AvailabilityMask:
    """A bool [C] availability mask on the host, with its device copies made once per device and
    dtype (pinned and non-blocking on CUDA). Immutable: a new PSR mask is a new object."""

    def __init__(self, host: torch.Tensor) -> None:
        if host.device.type != "cpu":
            raise ValueError(f"AvailabilityMask wants the host mask, got one on {host.device}")
        self.host = host
        self.all = bool(host.all())  # host reads: no device sync
        self.count = int(host.sum())
        self._copies: dict[tuple, torch.Tensor] = {}

    def on(self, device: Union[torch.device, str], dtype: torch.dtype = torch.bool,
           blocked: bool = False) -> torch.Tensor:
        """The mask (``blocked``: its complement) as ``dtype`` on ``device``, copied once."""
        key = (str(device), dtype, blocked)
        if key not in self._copies:
            values = ~self.host if blocked else self.host
            values = values.to(dtype)
            if torch.cuda.is_available() and torch.device(device).type == "cuda":
                values = values.pin_memory()  # a pinned source lets the copy run without a stall
            self._copies[key] = values.to(device, non_blocking=True)
        return self._copies[key]


def as_mask(allowed: Union[None, torch.Tensor, AvailabilityMask]) -> Optional[AvailabilityMask]:
    """None (all available) | host bool tensor | AvailabilityMask -> AvailabilityMask or None. A
    device tensor is read back once (a sync): callers that route every step pass the host mask."""
    if allowed is None or isinstance(allowed, AvailabilityMask):
        return allowed
    return AvailabilityMask(allowed.cpu())


class GateOutput(NamedTuple):
    probs: torch.Tensor  # [T, C] gate weights, zero off the top-k
    routing_map: torch.Tensor  # [T, C] bool, exactly k True per row
    aux_scores: torch.Tensor  # [T, C] fp32 scores for the balance loss: a distribution over the
    # available candidates (rows sum to 1; masked candidates 0)


def gate(
    logits: torch.Tensor,
    topk: int,
    gating: str,
    allowed: Union[None, torch.Tensor, AvailabilityMask] = None,
    mask_on: str = "scores",
    selection_bias: Optional[torch.Tensor] = None,
) -> GateOutput:
    """``logits`` [T, C]; ``allowed`` bool [C] or an AvailabilityMask (None: all available);
    ``selection_bias`` [C] or None."""
    mask = as_mask(allowed)
    blocked = None if mask is None or mask.all else mask.on(logits.device, blocked=True)
    if blocked is not None and mask_on == "logits":
        logits = logits.masked_fill(blocked, float("-inf"))

    if gating == "softmax_then_topk":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
        if blocked is not None:
            scores = scores.masked_fill(blocked, 0.0)
        top_probs, top_idx = _select(scores, topk, selection_bias, blocked)
        aux_scores = scores.float()
    elif gating == "topk_then_softmax":
        selectable = logits if blocked is None else logits.masked_fill(blocked, float("-inf"))
        top_logits, top_idx = _select(selectable, topk, selection_bias, blocked)
        top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)
        aux_scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if blocked is not None:
            aux_scores = aux_scores.masked_fill(blocked, 0.0)
    elif gating == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if blocked is not None:
            scores = scores.masked_fill(blocked, 0.0)
        top_scores, top_idx = _select(scores, topk, selection_bias, blocked)
        top_probs = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else top_scores
        aux_scores = scores.float() / (scores.float().sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"gating must be softmax_then_topk, topk_then_softmax or sigmoid, got {gating!r}")

    if blocked is not None:
        # The balance loss asks "is load uniform over the candidates this router may use now?": its
        # scores are a distribution over the available ones. Without this, post-softmax masking
        # leaves only ~N_t/(r*N) of the mass and silently weakens the loss by ~r early in PSR.
        aux_scores = aux_scores / aux_scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_idx, 1).bool()
    return GateOutput(probs, routing_map, aux_scores)


def _select(values: torch.Tensor, topk: int, bias: Optional[torch.Tensor],
            blocked: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``values`` (+ ``bias`` for the choice only) -> (unbiased values there, indices)."""
    if bias is None:
        return torch.topk(values, k=topk, dim=1)
    biased = values + bias.to(values.device)
    if blocked is not None:
        biased = biased.masked_fill(blocked, float("-inf"))
    _, top_idx = torch.topk(biased, k=topk, dim=1)
    return torch.gather(values, 1, top_idx), top_idx


def normalize_gates(probs: torch.Tensor, mode: str, available: int, experts_per_layer: int) -> torch.Tensor:
    """rexmoe.gate_normalization on [T, C] gates (zero off the top-k): none | renorm_topk (each
    row sums to 1) | scale_candidates (x available / experts_per_layer, i.e. N_t / N)."""
    if mode == "none":
        return probs
    if mode == "renorm_topk":
        return probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if mode == "scale_candidates":
        return probs * (available / experts_per_layer)
    raise ValueError(f"gate_normalization must be none, renorm_topk or scale_candidates, got {mode!r}")
