"""PSR: candidate counts follow the formulas; the mask is a pure function of (seed, step, layer)."""

from __future__ import annotations

import math

import pytest
import torch

from rexmoe_train.core.gating import gate
from rexmoe_train.core.psr import PSRSchedule, PSRState, psr_allowed_mask

N, R, TS, TE = 64, 4, 10_000, 30_000


def reference_count(kind: str, t: int) -> int:
    """The spec's formulas written independently (floats), for cross-checking."""
    if kind == "none" or t > TE:
        return R * N
    if t <= TS:
        return N
    x = (t - TS) / (TE - TS)
    if kind == "linear":
        return math.floor((1 + (R - 1) * x) * N + 1e-9)
    if kind == "stepwise":
        return N * (1 + math.floor((R - 1) * x + 1e-9))
    return math.floor((1 + (R - 1) * (1 - math.cos(math.pi * x)) / 2) * N + 1e-9)


@pytest.mark.parametrize("kind", ["linear", "stepwise", "cosine", "none"])
def test_counts_match_formula_before_during_after(kind):
    s = PSRSchedule(kind, N, R, TS, TE)
    for t in [0, 1, TS - 1, TS, TS + 1, 15_000, 20_000, 25_000, TE - 1, TE, TE + 1, 47_700]:
        assert s.num_candidates(t) == reference_count(kind, t), (kind, t)
    if kind != "none":
        assert s.num_candidates(TS) == N and s.num_candidates(TE + 1) == R * N
        counts = [s.num_candidates(t) for t in range(0, TE + 2, 250)]
        assert counts == sorted(counts), "never shrinks"


def test_paper_values():
    # the paper's 2.3B run: 64 candidates until 10k, linearly to 256 at 30k
    linear = PSRSchedule("linear", 64, 4, 10_000, 30_000)
    assert [linear.num_candidates(t) for t in (10_000, 20_000, 30_000)] == [64, 160, 256]
    # the paper's stepwise variant, 128/192/256 at 10k/20k/30k, is start_step=0, end_step=30k
    stepwise = PSRSchedule("stepwise", 64, 4, 0, 30_000)
    assert [stepwise.num_candidates(t) for t in (9_999, 10_000, 20_000, 30_000)] == [64, 128, 192, 256]


def test_r1_never_masks():
    s = PSRSchedule("linear", 8, 1, 0, 10)
    assert all(psr_allowed_mask(s, t, 0, 0).all() for t in range(12))


def test_mask_pure_function_and_changes_between_steps():
    s = PSRSchedule("linear", 8, 4, 0, 100)
    masks = {t: psr_allowed_mask(s, t, seed=7, moe_layer=3) for t in range(1, 60)}
    for t, m in masks.items():
        assert torch.equal(m, psr_allowed_mask(s, t, seed=7, moe_layer=3))  # re-run
        assert int(m.sum()) == s.num_candidates(t)  # never masks more (or less) than the schedule
    assert len({tuple(m.tolist()) for m in masks.values()}) > 50  # a fresh draw each step
    other_layer = psr_allowed_mask(s, 30, seed=7, moe_layer=2)
    other_seed = psr_allowed_mask(s, 30, seed=8, moe_layer=3)
    assert not torch.equal(other_layer, masks[30]) or not torch.equal(other_seed, masks[30])


def test_protect_local_keeps_own_experts():
    s = PSRSchedule("linear", 8, 4, 0, 100)
    own = range(16, 24)
    for t in range(1, 100, 7):
        m = psr_allowed_mask(s, t, seed=1, moe_layer=2, protect=own)
        assert m[16:24].all()
        assert int(m.sum()) == s.num_candidates(t)


@pytest.mark.parametrize("gating", ["softmax_then_topk", "topk_then_softmax", "sigmoid"])
@pytest.mark.parametrize("mask_on", ["scores", "logits"])
def test_masked_candidates_never_selected(gating, mask_on):
    s = PSRSchedule("linear", 8, 4, 0, 100)
    g = torch.Generator().manual_seed(0)
    for t in (1, 20, 60):
        allowed = psr_allowed_mask(s, t, seed=3, moe_layer=0)
        logits = torch.randn(500, 32, generator=g)
        logits[:, ~allowed] += 10.0  # make the masked ones the most attractive
        out = gate(logits, 2, gating, allowed, mask_on)
        assert not out.routing_map[:, ~allowed].any()
        assert (out.routing_map.sum(1) == 2).all()
        assert (out.probs[:, ~allowed] == 0).all()
        assert torch.isfinite(out.aux_scores).all()
        assert (out.aux_scores[:, ~allowed] == 0).all()
        torch.testing.assert_close(out.aux_scores.sum(1), torch.ones(500))


def test_scores_mode_does_not_renormalise_but_logits_mode_does():
    allowed = torch.tensor([True, True, False, False])
    logits = torch.tensor([[1.0, 0.5, 2.0, 0.0]])
    full = torch.softmax(logits, -1)
    by_scores = gate(logits, 2, "softmax_then_topk", allowed, "scores").probs
    by_logits = gate(logits, 2, "softmax_then_topk", allowed, "logits").probs
    torch.testing.assert_close(by_scores[0, :2], full[0, :2])  # the paper: zero, don't renormalise
    torch.testing.assert_close(by_logits[0, :2], torch.softmax(logits[0, :2], -1))


def test_state_caches_per_step():
    state = PSRState(seed=5)
    s = PSRSchedule("linear", 8, 4, 0, 100)
    state.set_step(40)
    a = state.allowed(s, 1, None)
    state.set_step(41)
    b = state.allowed(s, 1, None)
    assert torch.equal(a, psr_allowed_mask(s, 40, 5, 1)) and torch.equal(b, psr_allowed_mask(s, 41, 5, 1))


def test_bad_schedule_rejected():
    with pytest.raises(ValueError, match="end_step"):
        PSRSchedule("linear", 8, 4, 10, 10)
    with pytest.raises(ValueError, match="schedule"):
        PSRSchedule("exponential", 8, 4, 0, 10)


def test_nested_masks_only_grow_and_keep_the_schedule_count():
    # mask_draw=nested: one random order per (seed, layer); the available set at a later step contains
    # the one at any earlier step, and the count is the schedule's
    for protect in (None, range(8, 16)):
        s = PSRSchedule("linear", 8, 4, 10, 70, draw="nested")
        masks = [psr_allowed_mask(s, t, seed=7, moe_layer=1, protect=protect) for t in range(0, 75)]
        for t, m in enumerate(masks):
            assert int(m.sum()) == s.num_candidates(t)
            if protect is not None:
                assert m[8:16].all()
            if t:
                assert not (masks[t - 1] & ~m).any(), f"step {t} closed a candidate open at step {t - 1}"
        assert len({tuple(m.tolist()) for m in masks[:11]}) == 1  # t <= t_s: one fixed set, no redraw
        assert masks[-1].all()
        # a pure function of (seed, layer): other layers / seeds get another order
        assert torch.equal(masks[40], psr_allowed_mask(s, 40, seed=7, moe_layer=1, protect=protect))
        others = {tuple(psr_allowed_mask(s, 40, seed=sd, moe_layer=ly, protect=protect).tolist())
                  for sd in (7, 8) for ly in (0, 1, 2)}
        assert len(others) > 1
    # per_step (the paper) redraws: its masks at t <= t_s differ between steps
    per_step = PSRSchedule("linear", 8, 4, 10, 70)
    assert len({tuple(psr_allowed_mask(per_step, t, 7, 1).tolist()) for t in range(11)}) > 5
    with pytest.raises(ValueError, match="mask_draw"):
        PSRSchedule("linear", 8, 4, 0, 10, draw="sometimes")
