"""load_entropy: the routing-load entropy logged per MoE layer (training/metrics.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rexmoe_train.training.metrics import load_entropy


def test_uniform_is_one_and_one_hot_is_zero():
    assert load_entropy(torch.full((32,), 7.0)) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([0.0, 12.0, 0.0, 0.0])) == 0.0


def test_against_a_hand_count():
    load = torch.tensor([3.0, 1.0, 0.0, 4.0])  # shares 3/8, 1/8, 0, 1/2 over 4 candidates
    shares = [3 / 8, 1 / 8, 1 / 2]
    expected = -sum(p * math.log(p) for p in shares) / math.log(4)
    assert load_entropy(load) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("load", [torch.zeros(8), torch.tensor([5.0]), torch.zeros(0)])
def test_no_tokens_or_one_candidate_is_zero(load):
    assert load_entropy(load) == 0.0
