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
