"""ReXMoELayer with r = 1 is exactly megatron-core's MoELayer (same weights, same input)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import tiny_config


def _pair(cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from rexmoe_train.model.experts import ExpertBanks
    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.model.moe_layer import ReXMoEContext, ReXMoELayer
    from rexmoe_train.model.psr import PSRState
    from rexmoe_train.model.reuse import ReusePlan

    tc = transformer_config(cfg)
    submodules = get_gpt_layer_local_spec(num_experts=cfg.model.num_moe_experts,
                                          moe_grouped_gemm=False).submodules.mlp.submodules
    stock_cfg = copy.copy(tc)
    stock_cfg.moe_router_load_balancing_type = "aux_loss"
    stock_cfg.moe_aux_loss_coeff = cfg.rexmoe.balance.layer_aux_coeff
    stock = MoELayer(stock_cfg, copy.deepcopy(submodules), layer_number=1)
    ctx = ReXMoEContext(plan=ReusePlan.from_config(cfg), rexmoe=cfg.rexmoe, psr_state=PSRState(0),
                        banks=ExpertBanks(tc))
    ours = ReXMoELayer(tc, copy.deepcopy(submodules), layer_number=1, context=ctx, moe_layer=0)
    for layer in (stock, ours):
        layer.set_layer_number(1)
    with torch.no_grad():
        ours.router.weight.copy_(stock.router.weight)
        for mine, theirs in zip(ours.experts.local_experts, stock.experts.local_experts):
            for p_mine, p_theirs in zip(mine.parameters(), theirs.parameters()):
                p_mine.copy_(p_theirs)
    return stock, ours


def _run(layer, hidden, weight):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    h = hidden.clone().requires_grad_(True)
    out, _ = layer(h)
    (out * weight).sum().backward()
    grads = [layer.router.weight.grad] + [p.grad for p in layer.experts.parameters()]
    return out.detach(), h.grad, grads


@pytest.mark.parametrize("gating", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_r1_matches_stock_megatron_moe_layer(layout, gating):
    cfg = tiny_config(r=1, layers=2, gating=gating)
    layout(cfg.parallel)
    stock, ours = _pair(cfg)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 3, cfg.model.hidden_size, generator=g)
    weight = torch.randn(16, 3, cfg.model.hidden_size, generator=g)
    out_s, dh_s, grads_s = _run(stock, hidden, weight)
    out_o, dh_o, grads_o = _run(ours, hidden, weight)
    assert out_s.abs().max() > 0
    torch.testing.assert_close(out_o, out_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(dh_o, dh_s, rtol=0, atol=1e-6)
    assert len(grads_o) == len(grads_s)
    for a, b in zip(grads_o, grads_s):
        assert b is not None and b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_balance_loss_changes_router_gradient(layout):
    """The equivalence above must include the aux loss: without it the router grads differ."""
    cfg = tiny_config(r=1, layers=2)
    layout(cfg.parallel)
    stock, ours = _pair(cfg)
    ours.router.layer_aux_coeff = 0.0
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(16, 3, cfg.model.hidden_size, generator=g)
    weight = torch.randn(16, 3, cfg.model.hidden_size, generator=g)
    grads_s = _run(stock, hidden, weight)[2]
    grads_o = _run(ours, hidden, weight)[2]
    assert (grads_o[0] - grads_s[0]).abs().max() > 1e-6
