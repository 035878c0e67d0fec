"""gate() equals megatron-core's topk_routing_with_score_function when nothing is masked."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train import compat

compat.install()

from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function  # noqa: E402

from rexmoe_train.core.gating import gate  # noqa: E402

MEGATRON = {
    "softmax_then_topk": dict(use_pre_softmax=True, score_function="softmax"),
    "topk_then_softmax": dict(use_pre_softmax=False, score_function="softmax"),
    "sigmoid": dict(use_pre_softmax=False, score_function="sigmoid"),
}


@pytest.mark.parametrize("gating", list(MEGATRON))
@pytest.mark.parametrize("topk", [1, 2, 4])
def test_unmasked_gate_is_megatron(gating, topk):
    logits = torch.randn(300, 16, generator=torch.Generator().manual_seed(topk))
    probs, routing_map = topk_routing_with_score_function(logits, topk, **MEGATRON[gating])
    out = gate(logits, topk, gating, allowed=torch.ones(16, dtype=torch.bool))
    assert torch.equal(out.routing_map, routing_map)
    assert torch.equal(out.probs, probs)


def test_bad_gating_named():
    with pytest.raises(ValueError, match="gating must be"):
        gate(torch.zeros(2, 4), 1, "softmax")


def test_sigmoid_selection_bias_is_megatron_expert_bias():
    """megatron's aux-loss-free routing (sigmoid + expert_bias): same choice, same unbiased gates."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(400, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.3
    for topk in (1, 2, 4):
        probs, routing_map = topk_routing_with_score_function(logits, topk, expert_bias=bias,
                                                              **MEGATRON["sigmoid"])
        out = gate(logits, topk, "sigmoid", selection_bias=bias)
        assert torch.equal(out.routing_map, routing_map)
        assert torch.equal(out.probs, probs)
        # the bias changed the choice (else this test could not tell)
        assert not torch.equal(routing_map, gate(logits, topk, "sigmoid").routing_map)


@pytest.mark.parametrize("gating", list(MEGATRON))
@pytest.mark.parametrize("mask_on", ["scores", "logits"])
def test_selection_bias_picks_by_biased_scores_gates_stay_unbiased(gating, mask_on):
    """Independent reference: pick by (score + bias) over the allowed candidates; the gate values are
    those of the unbiased gating restricted to the picked set."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 12, generator=g)
    bias = torch.randn(12, generator=g) * 0.5
    allowed = torch.ones(12, dtype=torch.bool)
    allowed[[1, 5, 9]] = False
    bias[[1, 5, 9]] = 100.0  # a huge bias must not revive a masked candidate
    out = gate(logits, 2, gating, allowed, mask_on, selection_bias=bias)
    masked_logits = logits.masked_fill(~allowed, float("-inf"))
    if gating == "softmax_then_topk":
        base = torch.softmax(masked_logits if mask_on == "logits" else logits, dim=-1) * allowed
    elif gating == "topk_then_softmax":
        base = logits
    else:
        base = torch.sigmoid(logits) * allowed
    choice = (base + bias).masked_fill(~allowed, float("-inf")).topk(2, dim=1).indices
    want_map = torch.zeros_like(out.routing_map).scatter(1, choice, True)
    assert torch.equal(out.routing_map, want_map)
    assert not out.routing_map[:, ~allowed].any()
    kept = base.gather(1, choice)
    if gating == "topk_then_softmax":
        kept = torch.softmax(kept, dim=-1)
    elif gating == "sigmoid":
        kept = kept / kept.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(out.probs.gather(1, choice), kept, rtol=1e-6, atol=1e-7)


def test_gate_normalization():
    from rexmoe_train.core.gating import normalize_gates

    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    probs = gate(logits, 2, "softmax_then_topk").probs
    assert probs.sum(dim=-1).max() < 0.9  # the paper's gates over r*N candidates: well below 1
    renorm = normalize_gates(probs, "renorm_topk", 32, 8)
    torch.testing.assert_close(renorm.sum(dim=-1), torch.ones(50))
    assert torch.equal(renorm > 0, probs > 0)
    # softmax over 32 then top-2, scaled by 32/8: the same as x4
    torch.testing.assert_close(normalize_gates(probs, "scale_candidates", 32, 8), probs * 4.0)
    assert normalize_gates(probs, "none", 32, 8) is probs


@pytest.mark.parametrize("gating", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_availability_mask_decides_on_the_host_and_copies_once(gating):
    """Issue 29 item 4: the PSR mask's decisions (all available? how many?) come from its host copy and
    its device copy is made once; gate() gives the same result as with the plain host mask."""
    from rexmoe_train.core.gating import AvailabilityMask

    host = torch.ones(32, dtype=torch.bool)
    host[[1, 7, 8, 30]] = False
    mask = AvailabilityMask(host)
    assert (mask.all, mask.count) == (False, 28)
    assert AvailabilityMask(torch.ones(4, dtype=torch.bool)).all
    blocked = mask.on("cpu", blocked=True)
    assert blocked is mask.on("cpu", blocked=True) and torch.equal(blocked, ~host)  # one copy, cached
    assert mask.on("cpu", torch.uint8).dtype == torch.uint8
    logits = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    for a, b in zip(gate(logits, 4, gating, mask), gate(logits, 4, gating, host)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="wants the host mask"):
        AvailabilityMask(torch.ones(4, dtype=torch.bool, device="meta"))
