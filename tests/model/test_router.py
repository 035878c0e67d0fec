"""ReXMoERouter pieces whose GPU behaviour a CPU run cannot see by itself: the step counters under
bf16 wrapping, and capacity dropping with the PSR mask on the CPU and the probs on the device."""

from __future__ import annotations

import types

import pytest
import torch

from tests.helpers import tiny_config


def test_step_counters_stay_exact_float64_under_bf16_wrapping(layout):
    """Float16Module (bf16: the GPU default) casts every floating buffer of the model; bf16 token
    counts stop being exact at 256, and the metrics and expert-bias updates read them."""
    from megatron.core.transformer.module import Float16Module

    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2, layers=2)
    cfg.train.bf16 = True
    layout(cfg.parallel)
    built = build_model(cfg, 96)
    Float16Module(built.config, built.chunks[0])
    router = built.routers[0]
    assert router.weight.dtype == torch.bfloat16  # the wrapper did cast the module
    assert router.step_load.dtype == torch.float64 and router.step_routed.dtype == torch.float64
    router.step_load += 257.0
    assert float(router.step_load[0]) == 257.0


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drop_indexes_the_probs_on_their_own_device(policy):
    """The PSR mask is a CPU tensor; the probs and routing map live on the compute device. A distinct
    device label (meta) for the probs makes a CPU index visible here: index_copy refuses mixed
    devices as CUDA does."""
    from rexmoe_train.model.router import ReXMoERouter

    router = types.SimpleNamespace(topk=2, config=types.SimpleNamespace(
        moe_token_drop_policy=policy, moe_expert_capacity_factor=1.0))
    allowed = torch.tensor([True, False] * 4)
    probs = torch.rand(16, 8, device="meta")
    routing_map = torch.zeros(16, 8, dtype=torch.bool, device="meta")
    kept_probs, kept_map = ReXMoERouter._drop_over_capacity(router, probs, routing_map, allowed)
    assert kept_probs.device == probs.device and kept_map.device == probs.device
    assert kept_probs.shape == probs.shape and kept_map.shape == routing_map.shape


@pytest.mark.parametrize("draw", ["per_step", "nested"])
def test_available_candidates_follow_the_configured_mask_draw(layout, draw):
    """rexmoe.psr.mask_draw reaches the router: nested masks only grow, per-step masks are redrawn."""
    from rexmoe_train.core.psr import psr_allowed_mask
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=4, layers=4, psr="linear", start_step=2, end_step=10, mask_draw=draw)
    layout(cfg.parallel)
    built = build_model(cfg, 96)
    router = built.routers[1]
    assert router.psr_schedule.draw == draw
    seen = []
    for step in range(1, 12):
        built.psr_state.set_step(step)
        seen.append(router.available().clone())
        assert torch.equal(seen[-1], psr_allowed_mask(router.psr_schedule, step, cfg.psr_seed, 1))
    only_grows = all(not (before & ~after).any() for before, after in zip(seen, seen[1:]))
    assert only_grows == (draw == "nested")
    assert seen[-1].all()


def test_forced_balance_spreads_tokens_evenly_over_the_available_candidates(layout):
    """model.moe_router_force_load_balancing (benchmark only): megatron's random router logits, then
    the ReXMoE gate with the PSR mask. With weights that send every token to the same candidates, the
    normal router concentrates the load; forced, the load over the AVAILABLE candidates is uniform
    within sampling noise and the masked candidates get nothing."""
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=4, layers=4, psr="linear", start_step=0, end_step=10)
    cfg.model.moe_router_force_load_balancing = True
    layout(cfg.parallel)
    built = build_model(cfg, 96)
    built.psr_state.set_step(4)  # 8 + 24 * 4 // 10 = 17 of 32 candidates available
    router = built.routers[1]
    assert router.config.moe_router_force_load_balancing  # the field reaches megatron's router config
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.arange(router.weight.shape[0], dtype=torch.float32)  # skewed
    router.train()
    hidden = torch.rand(2048, 1, cfg.model.hidden_size) + 1.0
    allowed = router.available()
    # the placement is the identity at ep = 1: physical order is candidate order
    balanced = router(hidden)[1].sum(dim=0).double()
    router.config.moe_router_force_load_balancing = False
    skewed = router(hidden)[1].sum(dim=0).double()
    assert int(allowed.sum()) == 17
    expected = 2048 * 2 / 17  # tokens * k / available
    assert skewed.max() > 0.5 * 2048  # the weights alone route (nearly) every token to one candidate
    assert balanced[~allowed].sum() == 0  # the PSR mask is respected
    assert balanced.sum() == 2048 * 2
    # each available candidate within 5 standard deviations of the uniform expectation (binomial)
    spread = (expected * (1 - 2 / 17)) ** 0.5
    assert (balanced[allowed] - expected).abs().max() < 5 * spread, balanced[allowed]
