"""ReXMoELayer with r = 1 is exactly megatron-core's MoELayer (same weights, same input)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import tiny_config


def _pair(cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from rexmoe_train.core.psr import PSRState
    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.model.moe_layer import ReXMoELayer
    from rexmoe_train.model.runtime import build_group_runtimes

    tc = transformer_config(cfg)
    submodules = get_gpt_layer_local_spec(num_experts=cfg.model.num_moe_experts,
                                          moe_grouped_gemm=False).submodules.mlp.submodules
    stock_cfg = copy.copy(tc)
    stock_cfg.moe_router_load_balancing_type = "aux_loss"
    stock_cfg.moe_aux_loss_coeff = cfg.rexmoe.balance.layer_aux_coeff
    stock = MoELayer(stock_cfg, copy.deepcopy(submodules), layer_number=1)
    plan = cfg.reuse_plan()
    runtime = build_group_runtimes(cfg, tc, plan, PSRState(0), submodules.experts, plan.groups[:1])[0]
    ours = ReXMoELayer(tc, copy.deepcopy(submodules), layer_number=1, runtime=runtime, moe_layer=0)
    for layer in (stock, ours):
        layer.set_layer_number(1)
    with torch.no_grad():
        ours.router.weight.copy_(stock.router.weight)
        for mine, theirs in zip(ours.experts.local_experts, stock.experts.local_experts):
            for p_mine, p_theirs in zip(mine.parameters(), theirs.parameters()):
                p_mine.copy_(p_theirs)
    return stock, ours


def _assert_layers_agree(stock, ours, hidden, weight):
    """Same output, input gradient and router + expert gradients (atol 1e-6); returns stock's
    output and gradients."""
    out_s, dh_s, grads_s = _run(stock, hidden, weight)
    out_o, dh_o, grads_o = _run(ours, hidden, weight)
    torch.testing.assert_close(out_o, out_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(dh_o, dh_s, rtol=0, atol=1e-6)
    assert len(grads_o) == len(grads_s)
    for a, b in zip(grads_o, grads_s):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    return out_s, grads_s


def _run(layer, hidden, weight):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    h = hidden.clone().requires_grad_(True)
    out, _ = layer(h)
    (out * weight).sum().backward()
    grads = [layer.router.weight.grad] + [p.grad for p in layer.experts.parameters()]
    return out.detach(), h.grad, grads


def _inputs(cfg, seed: int):
    """Hidden states [seq 16, batch 3, hidden] and the weights of the scalar the backward starts from."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 3, cfg.model.hidden_size, generator=g),
            torch.randn(16, 3, cfg.model.hidden_size, generator=g))


@pytest.mark.parametrize("gating", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_r1_matches_stock_megatron_moe_layer(layout, gating):
    cfg = tiny_config(r=1, layers=2, gating=gating)
    layout(cfg.parallel)
    stock, ours = _pair(cfg)
    out_s, grads_s = _assert_layers_agree(stock, ours, *_inputs(cfg, seed=0))
    assert out_s.abs().max() > 0
    assert all(b is not None and b.abs().max() > 0 for b in grads_s)


def test_balance_loss_changes_router_gradient(layout):
    """The equivalence above must include the aux loss: without it the router grads differ."""
    cfg = tiny_config(r=1, layers=2)
    layout(cfg.parallel)
    stock, ours = _pair(cfg)
    ours.router.layer_aux_coeff = 0.0
    hidden, weight = _inputs(cfg, seed=1)
    grads_s = _run(stock, hidden, weight)[2]
    grads_o = _run(ours, hidden, weight)[2]
    assert (grads_o[0] - grads_s[0]).abs().max() > 1e-6


def test_r1_capacity_factor_matches_stock_megatron(layout, policy="probs"):
    """Token dropping at r = 1 is megatron's: same capacity, same tokens dropped, same gradients.
    (Only the probs policy: megatron's position policy picks among tied 0/1 entries with top-k, so
    it does not keep the earliest tokens; ours does, checked against an oracle below.)"""
    cfg = tiny_config(r=1, layers=2)
    cfg.model.moe_expert_capacity_factor, cfg.model.moe_token_drop_policy = 0.5, policy
    layout(cfg.parallel)
    stock, ours = _pair(cfg)
    hidden, weight = _inputs(cfg, seed=2)
    _assert_layers_agree(stock, ours, hidden, weight)
    # and the factor really dropped tokens: 48 tokens * top-2 over 8 experts at 0.5 -> 6 per expert
    ours.train()
    _, routing_map = ours.router(hidden.clone())
    assert routing_map.sum(dim=0).max() <= 6 and routing_map.sum() < 48 * 2


def _oracle_drop(probs, routing_map, allowed, capacity, policy):
    """Per available candidate keep at most `capacity` tokens: the highest gate values (probs) or
    the first tokens in order (position). Written independently of megatron's helper."""
    keep = torch.zeros_like(routing_map)
    for c in allowed.nonzero().squeeze(1).tolist():
        tokens = routing_map[:, c].nonzero().squeeze(1).tolist()
        if policy == "probs":
            tokens.sort(key=lambda t: -float(probs[t, c]))
        for t in tokens[:capacity]:
            keep[t, c] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_counts_available_candidates_only(layout, policy):
    """r = 4 mid-PSR-ramp: the quota is ceil(C * tokens * k / N_t) over the N_t available candidates,
    masked candidates get nothing, and exactly the over-quota assignments are dropped."""
    import math

    from rexmoe_train.core.gating import gate
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=4, layers=4, psr="linear", start_step=0, end_step=10)
    cfg.model.moe_expert_capacity_factor, cfg.model.moe_token_drop_policy = 1.0, policy
    layout(cfg.parallel)
    built = build_model(cfg, 96)
    built.psr_state.set_step(4)  # N_t = 8 + 3*8*4//10 = 17 of 32
    router = built.routers[1]
    router.train()
    allowed = router.available()
    assert int(allowed.sum()) == 17
    hidden = torch.randn(40, 1, cfg.model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # skewed logits so that some candidates overflow
        router.weight[:3] += 0.5 * router.weight[:3].sign()
        logits = router.gating(hidden).view(40, -1)
        out = gate(logits, 2, cfg.rexmoe.gating, allowed, cfg.rexmoe.psr.mask_on)
    probs, routing_map = router.routing(router.gating(hidden))  # training: counts the step load
    probs = probs.detach()
    assert router.placement.is_identity  # ep = 1: physical order is candidate order
    capacity = math.ceil(1.0 * 40 * 2 / 17)
    expected = _oracle_drop(out.probs, out.routing_map, allowed, capacity, policy)
    assert out.routing_map.sum(dim=0).max() > capacity  # the test routing does overflow
    assert torch.equal(routing_map, expected)
    torch.testing.assert_close(probs, out.probs * expected)
    assert not routing_map[:, ~allowed].any()
    assert router.step_load.sum() == expected.sum() and router.step_routed == out.routing_map.sum()
    from rexmoe_train.training.metrics import router_load

    dropped = router_load(cfg, built.routers, 4)["dropped_fraction"]
    assert dropped[0] == 0.0  # routers that routed nothing this step
    assert dropped[1] == round(1 - float(expected.sum()) / float(out.routing_map.sum()), 4) > 0
