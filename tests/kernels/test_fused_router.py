"""Fused router (softmax -> PSR mask on scores -> top-k) vs gating.gate, its torch reference."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train.core.gating import gate
from rexmoe_train.kernels import _triton
from rexmoe_train.kernels.fused_router import fused_router, fused_router_reference

# (tokens, candidates, topk): C not a power of two, T not a multiple of the token block (the block is
# 4096 // next_pow2(C) rows, capped at 64), C = 256 = the paper's 2.3B with r=4.
CASES = [(1, 8, 1), (37, 24, 3), (70, 256, 8), (33, 40, 4), (130, 96, 6)]


def _allowed(kind: str, cands: int, topk: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(cands, dtype=torch.bool)
    gen = torch.Generator().manual_seed(cands)
    allowed = torch.rand(cands, generator=gen) < 0.6
    allowed[torch.randperm(cands, generator=gen)[:topk]] = True  # PSR keeps N_t >= N >= k
    return allowed


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-C{}-k{}".format(*c))
@pytest.mark.parametrize("mask", ["none", "all", "random"])
def test_matches_gate(triton_cpu, poisoned, case, mask):
    tokens, cands, topk = case
    logits = torch.randn(tokens, cands, generator=torch.Generator().manual_seed(tokens))
    allowed = _allowed(mask, cands, topk)
    ref = fused_router(logits, topk, allowed, impl="torch")
    got = fused_router(logits, topk, allowed, impl="triton")
    for name, x, y in zip(ref._fields, ref, got):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert not (y.is_floating_point() and y.isnan().any()), f"{name}: unwritten elements"
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(x, y), name
    # the reference really is gate(): same dense outputs
    g = gate(logits, topk, "softmax_then_topk", allowed, "scores")
    assert torch.equal(ref.routing_map, g.routing_map) and torch.equal(ref.probs, g.probs)
    if allowed is not None:
        assert not got.routing_map[:, ~allowed].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounds_scores_like_gate(triton_cpu, poisoned, dtype):
    logits = torch.randn(29, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    allowed = _allowed("random", 48, 4)
    ref = fused_router(logits, 4, allowed, impl="torch")
    got = fused_router(logits, 4, allowed, impl="triton")
    # The kernel rounds the scores to the logits dtype like gate() does. The triton 3.9 INTERPRETER
    # truncates fp32 -> bf16 (compiled kernels round to nearest), so allow one bf16 step here; the
    # GPU test checks the compiled kernel tightly.
    tol = {"rtol": 8e-3, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-6}
    torch.testing.assert_close(got.values.float(), ref.values.float(), **tol)
    torch.testing.assert_close(got.aux_scores, ref.aux_scores, **tol)
    assert_topk_of(ref, got, tol)


def assert_topk_of(ref, got, tol) -> None:
    """got picked k candidates whose reference scores are the reference's top-k scores (equal-score
    candidates may be swapped), never a masked one, k per row."""
    dense_ref = ref.aux_scores  # masked scores (renormalised under a mask: same order)
    torch.testing.assert_close(dense_ref.gather(1, got.indices), dense_ref.gather(1, ref.indices), **tol)
    assert torch.equal(got.routing_map.sum(dim=1), ref.routing_map.sum(dim=1))


def test_sparse_outputs_only(triton_cpu, poisoned):
    logits = torch.randn(19, 24)
    got = fused_router(logits, 3, None, dense=False, impl="triton")
    ref = fused_router_reference(logits, 3, None, dense=False)
    assert got.probs is None and got.routing_map is None and got.aux_scores is None
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.values, ref.values)


def test_ties_take_the_lowest_index(triton_cpu):
    """Documented tie rule: among equal scores the lowest candidate index wins, in both paths."""
    logits = torch.zeros(5, 12)
    logits[:, 7] = 1.0  # one clear winner, then eleven-way tie
    allowed = torch.ones(12, dtype=torch.bool)
    allowed[0] = False  # a masked score (0) never ties with the positive ones
    got = fused_router(logits, 3, allowed, impl="triton")
    ref = fused_router(logits, 3, allowed, impl="torch")
    assert torch.equal(got.indices, torch.tensor([[7, 1, 2]] * 5))
    torch.testing.assert_close(got.values, ref.values)


def test_gradients_match_gate(triton_cpu):
    logits0 = torch.randn(23, 40)
    allowed = _allowed("random", 40, 4)
    gen = torch.Generator().manual_seed(9)
    w_values, w_probs, w_aux = (torch.randn(23, 4, generator=gen), torch.randn(23, 40, generator=gen),
                                torch.randn(23, 40, generator=gen))
    grads = []
    for impl in ("torch", "triton"):
        logits = logits0.clone().requires_grad_()
        out = fused_router(logits, 4, allowed, impl=impl)
        ((out.values * w_values).sum() + (out.probs * w_probs).sum()
         + (out.aux_scores * w_aux).sum()).backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_gate(dtype, monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)
    logits = torch.randn(8191, 256, device="cuda").to(dtype)
    allowed = _allowed("random", 256, 8).cuda()
    ref = fused_router(logits, 8, allowed, impl="torch")
    got = fused_router(logits, 8, allowed, impl="triton")
    # fp32 softmax may differ by an ulp between the kernel and torch; in bf16 that can flip a rounding
    # step (and the order of near-equal candidates), so compare with the dtype's tolerance.
    tol = {"rtol": 8e-3, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    assert not got.probs.isnan().any() and not got.aux_scores.isnan().any()
    torch.testing.assert_close(got.values.float(), ref.values.float(), **tol)
    torch.testing.assert_close(got.aux_scores, ref.aux_scores, **tol)
    assert_topk_of(ref, got, tol)
    agree = (got.indices == ref.indices).all(dim=1).float().mean().item()
    assert agree > (0.9 if dtype == torch.bfloat16 else 0.999), agree  # bf16: ties at the k-th place


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_backward_matches_gate(dtype):
    """The compiled kernel's backward against the torch reference's autograd (2.3B r=4: 256
    candidates), on the rows where both chose the same experts (near-ties may differ by an ulp)."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    logits0 = torch.randn(8191, 256, device="cuda", generator=gen).to(dtype)
    allowed = _allowed("random", 256, 8).cuda()
    grads, chosen, weights = [], [], None
    for impl in ("torch", "triton"):
        logits = logits0.clone().requires_grad_()
        out = fused_router(logits, 8, allowed, impl=impl)
        if weights is None:
            weights = [torch.randn(t.shape, device="cuda", generator=gen).to(t.dtype)
                       for t in (out.values, out.probs, out.aux_scores)]
        ((out.values * weights[0]).float().sum() + (out.probs * weights[1]).float().sum()
         + (out.aux_scores * weights[2]).float().sum()).backward()
        grads.append(logits.grad)
        chosen.append(out.indices)
    same = (chosen[0] == chosen[1]).all(dim=1)
    assert same.float().mean().item() > (0.9 if dtype == torch.bfloat16 else 0.999)
    assert not grads[1].isnan().any()
    tol = {"rtol": 2e-2, "atol": 2e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(grads[1][same].float(), grads[0][same].float(), **tol)
