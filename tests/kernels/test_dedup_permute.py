"""Dedup permute / unpermute: Triton kernels (interpreter on CPU, compiled on GPU) vs the torch
reference, which is the CPU path."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train.kernels import _triton
from rexmoe_train.kernels.dedup_permute import dedup_layout, dedup_permute, dedup_unpermute, dense_from_topk
from rexmoe_train.kernels.fused_router import fused_router

# (tokens, hidden, ep, local experts per rank, topk, skew): skew routes most tokens to rank 0 so the
# splits are uneven and some ranks receive no rows at all. hidden=300 spans two 256-column chunks.
CASES = [
    (1, 8, 1, 4, 1, False),
    (37, 20, 3, 4, 3, False),
    (50, 300, 4, 2, 4, False),
    (16, 24, 2, 8, 2, True),
    (33, 16, 4, 3, 5, True),
]


def routing(tokens: int, ep: int, local: int, topk: int, skew: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    experts = ep * local
    logits = torch.randn(tokens, experts, generator=gen)
    if skew:
        logits[:, :local] += 4.0  # rank 0's experts win most slots
        logits[: tokens // 2, local:] -= 50.0  # half the tokens use rank 0 only
    top = logits.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top, True)
    probs = torch.softmax(logits, dim=-1) * routing_map
    return routing_map, probs


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


def _assert_same(a, b, exact: bool):
    for name in ("rows", "gates", "slots", "tokens", "rows_per_rank", "row_of"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert not (y.is_floating_point() and y.isnan().any()), f"{name}: unwritten elements"
        if exact or not x.is_floating_point():
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}-ep{}-L{}-k{}-skew{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_and_unpermute_match_reference(triton_cpu, poisoned, case, dtype):
    tokens, hidden, ep, local, topk, skew = case
    routing_map, probs = routing(tokens, ep, local, topk, skew)
    probs = probs.to(dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    width = min(topk, local)
    ref = dedup_permute(x, routing_map, probs, ep, width, impl="torch")
    got = dedup_permute(x, routing_map, probs, ep, width, impl="triton")
    _assert_same(ref, got, exact=True)  # pure data movement: bit-exact
    if skew:
        assert (ref.rows_per_rank == 0).any() or ref.rows_per_rank.max() > 2 * ref.rows_per_rank.min()
    back = torch.randn_like(ref.rows)
    expected = dedup_unpermute(back, ref.row_of, impl="torch")
    out = dedup_unpermute(back, got.row_of, impl="triton")
    assert not out.isnan().any()
    # both sum a token's rows in ascending rank order in fp32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_token_without_experts_gets_zero_and_layout_is_send_order(triton_cpu, poisoned):
    routing_map, probs = routing(9, 3, 2, 2, False)
    routing_map[4] = False
    probs[4] = 0
    layout_rows = dedup_layout(routing_map, 3)[0]
    assert (layout_rows[4] == -1).all()
    p = dedup_permute(torch.randn(9, 5), routing_map, probs, 3, 2, impl="triton")
    # rank-major, token-minor: the all_to_all_single send order with input_splits = rows_per_rank
    ranks = torch.repeat_interleave(torch.arange(3), p.rows_per_rank)
    key = ranks * 100 + p.tokens
    assert torch.equal(key, key.sort().values)
    out = dedup_unpermute(torch.ones_like(p.rows), p.row_of, impl="triton")
    assert torch.equal(out[4], torch.zeros(5))
    assert torch.equal(out.sum(dim=1)[:4], (p.row_of[:4] >= 0).sum(dim=1).float() * 5)


def test_gradients_match_reference(triton_cpu):
    routing_map, probs0 = routing(21, 3, 4, 3, True, seed=3)
    x0 = torch.randn(21, 12)
    weights = None
    grads = {}
    for impl in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        probs = probs0.clone().requires_grad_()
        p = dedup_permute(x, routing_map, probs, 3, 3, impl=impl)
        if weights is None:
            gen = torch.Generator().manual_seed(1)
            weights = (torch.randn(p.rows.shape, generator=gen), torch.randn(p.gates.shape, generator=gen))
        # stand-in for "experts": scale rows by the summed gates, then combine
        combined = dedup_unpermute(p.rows * weights[0] * p.gates.sum(dim=1, keepdim=True), p.row_of,
                                   impl=impl)
        (combined.square().sum() + (p.gates * weights[1]).sum()).backward()
        grads[impl] = (x.grad, probs.grad)
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0])
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1])


def test_model_runs_the_triton_kernels_where_configured(triton_cpu, poisoned, layout):
    """rexmoe.kernels=triton: the router's gate is fused_router and the rexmoe_dedup dispatcher's
    permute/unpermute are the Triton kernels (here through the interpreter); the model's loss and
    every gradient equal the torch path's, mid-PSR-ramp, with and without a capacity factor."""
    import importlib
    from unittest import mock

    permute_module = importlib.import_module("rexmoe_train.kernels.dedup_permute")
    router_module = importlib.import_module("rexmoe_train.kernels.fused_router")
    from rexmoe_train.model.gpt import build_model
    from tests.helpers import tiny_config

    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    for capacity in (None, 1.0):
        results = {}
        for kernels in ("torch", "triton"):
            cfg = tiny_config(r=2, layers=2, hidden=32, psr="linear", start_step=0, end_step=10)
            cfg.model.moe_expert_capacity_factor = capacity
            cfg.parallel.moe_token_dispatcher_type = "rexmoe_dedup"
            cfg.rexmoe.kernels = kernels
            cfg.validate(world_size=1)
            layout(cfg.parallel, seed=11)  # same seed: same initial weights in both builds
            built = build_model(cfg, 96)
            built.psr_state.set_step(4)
            assert all(r.fused_gate == (kernels == "triton") for r in built.routers)
            model = built.chunks[0]
            launches = mock.patch.object(permute_module._PermuteFn, "apply",
                                         wraps=permute_module._PermuteFn.apply)
            with launches as permute, mock.patch.object(router_module._RouterFn, "apply",
                                                        wraps=router_module._RouterFn.apply) as gate:
                loss = model(x, pos, None, labels=x).float().sum()
                loss.backward()
            # one launch per MoE layer on the Triton path, none on the torch path
            assert permute.call_count == gate.call_count == (2 if kernels == "triton" else 0)
            results[kernels] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        (ref_loss, ref_grads), (loss, grads) = results["torch"], results["triton"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_router_to_permute_pipeline(triton_cpu, poisoned):
    """fused_router's sparse top-k feeds the permute through dense_from_topk (ep=4, 6 slots each)."""
    logits = torch.randn(45, 24)
    top = fused_router(logits, 5, None, dense=False, impl="triton")
    routing_map, probs = dense_from_topk(top.indices, top.values, 24)
    dense = fused_router(logits, 5, None, dense=True, impl="torch")
    assert torch.equal(routing_map, dense.routing_map)
    torch.testing.assert_close(probs, dense.probs)  # kernel vs torch softmax: ulp-level differences
    x = torch.randn(45, 16)
    got = dedup_permute(x, routing_map, probs, 4, 5, impl="triton")
    _assert_same(dedup_permute(x, routing_map, probs, 4, 5, impl="torch"), got, exact=True)


def test_auto_uses_torch_without_a_triton_gpu():
    from rexmoe_train import platform

    if platform.has_triton_gpu():
        pytest.skip("a Triton GPU is present")
    assert _triton.use_triton("auto") is False
    with pytest.raises(ValueError):
        _triton.use_triton("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_reference(dtype, monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)
    routing_map, probs = routing(4099, 8, 32, 8, True)  # 2.3B r=4: 256 candidates over ep=8
    routing_map, probs = routing_map.cuda(), probs.cuda().to(dtype)
    x = torch.randn(4099, 512, device="cuda", dtype=dtype)
    ref = dedup_permute(x, routing_map, probs, 8, 8, impl="torch")
    got = dedup_permute(x, routing_map, probs, 8, 8, impl="triton")
    _assert_same(ref, got, exact=True)
    back = torch.randn_like(ref.rows)
    torch.testing.assert_close(dedup_unpermute(back, got.row_of, impl="triton"),
                               dedup_unpermute(back, ref.row_of, impl="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_backward_match_reference(dtype):
    """The compiled kernels' backward (permute: rows and gates back to tokens and probs; unpermute:
    rows from the combined gradient) against the torch reference's autograd, at the 2.3B r=4 layout."""
    routing_map, probs0 = routing(4099, 8, 32, 8, True, seed=5)
    routing_map, probs0 = routing_map.cuda(), probs0.cuda().to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(2)
    x0 = torch.randn(4099, 512, device="cuda", dtype=dtype, generator=gen)
    weights, grads = None, {}
    for impl in ("torch", "triton"):
        x, probs = x0.clone().requires_grad_(), probs0.clone().requires_grad_()
        p = dedup_permute(x, routing_map, probs, 8, 8, impl=impl)
        if weights is None:
            weights = (torch.randn(p.rows.shape, device="cuda", dtype=dtype, generator=gen),
                       torch.randn(p.gates.shape, device="cuda", dtype=dtype, generator=gen))
        combined = dedup_unpermute(p.rows * weights[0] * p.gates.sum(dim=1, keepdim=True), p.row_of, impl=impl)
        (combined.float().square().sum() + (p.gates * weights[1]).float().sum()).backward()
        grads[impl] = (x.grad, probs.grad)
    for got, want in zip(grads["triton"], grads["torch"]):
        assert not got.isnan().any()
        # bf16: both sum up to ep rows per token in their own order; near-cancelling sums differ by
        # a few ulps of the largest term, so the absolute tolerance scales with the gradient's size
        tol = {"rtol": 2e-2, "atol": 2e-2 * float(want.float().abs().max())} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got.float(), want.float(), **tol)
