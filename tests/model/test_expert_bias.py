"""Aux-loss-free balancing (rexmoe.balance.moe_router_enable_expert_bias).

r = 1 with scope router is megatron's own expert-bias router: megatron only allows it with sigmoid
scores, so the op-for-op comparison is for sigmoid (the softmax gatings' biased choice is checked in
test_gating.py). The reuse cases (PSR masks, scope physical) are checked against a per-candidate
loop written from the rule in model/balance.py's docstring.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import tiny_config


def _model(cfg):
    from rexmoe_train.model.gpt import build_model

    return build_model(cfg, 96)


def _bias_config(r, layers, gating="sigmoid", scope="router", rate=0.05, **psr):
    cfg = tiny_config(r=r, layers=layers, gating=gating, **psr)
    b = cfg.rexmoe.balance
    b.layer_aux_coeff = b.z_loss_coeff = 0.0
    b.moe_router_enable_expert_bias, b.expert_bias_scope, b.moe_router_bias_update_rate = True, scope, rate
    return cfg


def test_r1_router_scope_is_megatron_expert_bias_router(layout):
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from rexmoe_train.core.gating import gate
    from rexmoe_train.model.balance import update_expert_bias

    cfg = _bias_config(r=1, layers=1)
    layout(cfg.parallel)
    model = _model(cfg)
    ours = model.routers[0]
    assert ours.expert_bias is not None and ours.expert_bias.dtype == torch.float32
    stock_cfg = copy.copy(ours.config)
    stock_cfg.moe_router_score_function = "sigmoid"  # megatron's requirement for expert bias
    stock = TopKRouter(config=stock_cfg, pg_collection=get_default_pg_collection())
    with torch.no_grad():
        stock.weight.copy_(ours.weight)
    assert torch.equal(stock.expert_bias, ours.expert_bias)  # both start at zero
    ours.train(), stock.train()
    g = torch.Generator().manual_seed(0)
    changed = False
    for step in range(1, 9):
        model.psr_state.set_step(step)
        ours.reset_step_state()
        reset_model_temporary_tensors(stock_cfg, [stock])
        for _ in range(2):  # two micro-batches per step
            hidden = torch.randn(16, 3, cfg.model.hidden_size, generator=g)
            probs_s, map_s = stock(hidden)
            probs_o, map_o = ours(hidden)
            assert torch.equal(map_o, map_s), step
            assert torch.equal(probs_o, probs_s), step
            plain = gate(ours.gating(hidden).view(-1, 8), cfg.model.moe_router_topk, "sigmoid")
            changed |= not torch.equal(plain.routing_map, map_o)
        assert torch.equal(ours.step_load.float(), stock.local_tokens_per_expert)
        _update_router_expert_bias([stock], stock_cfg)
        update_expert_bias(model.routers, "router", cfg.rexmoe.balance.moe_router_bias_update_rate)
        assert torch.equal(ours.expert_bias, stock.expert_bias), step
    assert changed  # the bias did change some choices: the comparison covered biased routing
    assert ours.expert_bias.abs().max() > 0


def _run_routers(model, cfg, step, seed=0):
    model.psr_state.set_step(step)
    g = torch.Generator().manual_seed(seed)
    loads = []
    for router in model.routers:
        router.train()
        router.reset_step_state()
        _, routing_map = router(torch.randn(32, 2, cfg.model.hidden_size, generator=g))
        # ep=1: the physical order is the candidate order
        loads.append(routing_map.sum(dim=0).double())
        assert torch.equal(loads[-1], router.step_load)
    return loads


@pytest.mark.parametrize("scope", ["router", "physical"])
@pytest.mark.parametrize("gating", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
def test_reuse_update_follows_rule_and_skips_masked(layout, scope, gating):
    from rexmoe_train.model.balance import update_expert_bias

    cfg = _bias_config(r=2, layers=2, gating=gating, scope=scope, rate=0.01, psr="linear",
                       start_step=0, end_step=10)
    layout(cfg.parallel)
    model = _model(cfg)
    routers = model.routers
    start = torch.randn(16, generator=torch.Generator().manual_seed(5)) * 0.02
    for router in routers:
        router.expert_bias.copy_(start)
    loads = _run_routers(model, cfg, step=4)  # mid-ramp: 8 + 8*4/10 = 11 of 16 candidates
    allowed = [router.available() for router in routers]
    assert all(int(a.sum()) == 11 for a in allowed) and not torch.equal(allowed[0], allowed[1])
    for load, a in zip(loads, allowed):
        assert load[~a].sum() == 0  # masked candidates were never selected
    update_expert_bias(routers, scope, 0.01)

    def sign(x):
        return (x > 0) - (x < 0)

    if scope == "router":
        for router, load, a in zip(routers, loads, allowed):
            mean = float(load[a].sum()) / int(a.sum())
            want = [float(start[c]) + 0.01 * sign(mean - float(load[c])) if a[c] else float(start[c])
                    for c in range(16)]
            torch.testing.assert_close(router.expert_bias, torch.tensor(want), rtol=0, atol=1e-7)
        return
    want = []
    for c in range(16):
        users = [j for j in range(2) if allowed[j][c]]
        if not users:
            want.append(float(start[c]))
            continue
        target = sum(float(loads[j][allowed[j]].sum()) / int(allowed[j].sum()) for j in users)
        pooled = sum(float(loads[j][c]) for j in range(2))
        want.append(float(start[c]) + 0.01 * sign(target - pooled))
    for router in routers:  # one bias per physical expert: the group's copies stay identical
        torch.testing.assert_close(router.expert_bias, torch.tensor(want), rtol=0, atol=1e-7)
    assert torch.equal(routers[0].expert_bias, routers[1].expert_bias)


def test_bias_steers_load_towards_balance(layout):
    """The point of the method: with a fixed router, repeated updates cut the max load violation."""
    from rexmoe_train.model.balance import load_violation, update_expert_bias

    cfg = _bias_config(r=2, layers=2, gating="softmax_then_topk", scope="physical", rate=2e-3)
    layout(cfg.parallel)
    model = _model(cfg)
    with torch.no_grad():  # a skewed router: a few candidates dominate
        for router in model.routers:
            router.weight[:3] += 0.5 * router.weight[:3].sign()
    first = None
    for _ in range(60):
        loads = _run_routers(model, cfg, step=1, seed=11)  # the same tokens every time
        pooled = loads[0] + loads[1]
        first = load_violation(pooled) if first is None else first
        update_expert_bias(model.routers, "physical", 2e-3)
    last = load_violation(pooled)
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("mode", ["renorm_topk", "scale_candidates"])
def test_router_gate_normalization(layout, mode):
    """rexmoe.gate_normalization through the router, against the same router with none."""
    cfg = tiny_config(r=2, layers=2, psr="linear", start_step=0, end_step=10)
    cfg.rexmoe.balance.layer_aux_coeff = cfg.rexmoe.balance.z_loss_coeff = 0.0
    layout(cfg.parallel)
    model = _model(cfg)
    model.psr_state.set_step(4)  # 11 of 16 candidates
    router = model.routers[0]
    hidden = torch.randn(16, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(2))
    plain, plain_map = router(hidden)
    router.gate_normalization = mode
    probs, routing_map = router(hidden)
    assert torch.equal(routing_map, plain_map)
    if mode == "renorm_topk":
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(32))
        torch.testing.assert_close(probs, plain / plain.sum(dim=-1, keepdim=True))
    else:
        torch.testing.assert_close(probs, plain * (11 / 8))
