"""Synthetic routing loads: counts add up, the hot expert is where and how hot it is said to be."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rexmoe_train.plan.load import RoutingLoad, capacity, column_counts, routing_map, rows_per_rank


def test_balanced_counts_spread_every_assignment_evenly():
    counts = column_counts(1000, 8, np.ones(64, bool), RoutingLoad())
    assert counts.sum() == 1000 * 8
    assert counts.max() - counts.min() <= 1


def test_masked_candidates_receive_nothing():
    available = np.zeros(32, bool)
    available[::4] = True  # PSR's first stage: N of r*N open
    counts = column_counts(100, 2, available, RoutingLoad())
    assert counts[~available].sum() == 0 and counts.sum() == 200


def test_imbalanced_load_heats_the_named_column_by_the_factor():
    counts = column_counts(1000, 2, np.ones(16, bool), RoutingLoad("imbalanced", 3.0), hot_column=5)
    mean = 1000 * 2 / 16
    assert counts[5] == round(3.0 * mean)
    assert counts.sum() == 2000
    assert counts.argmax() == 5


def test_hot_column_is_capped_at_one_pick_per_token():
    counts = column_counts(10, 8, np.ones(16, bool), RoutingLoad("imbalanced", 10.0))
    assert counts.max() <= 10


def test_capacity_factor_caps_every_column():
    counts = column_counts(1000, 2, np.ones(16, bool), RoutingLoad("imbalanced", 3.0), capacity_factor=1.0)
    assert counts.max() == capacity(1000, 2, 16, 1.0) == math.ceil(2000 / 16)


def test_routing_map_has_the_counts_and_distinct_tokens_per_column():
    counts = column_counts(200, 4, np.ones(32, bool), RoutingLoad("imbalanced", 2.0))
    route = routing_map(200, counts, seed=3)
    assert route.dtype == bool and route.shape == (200, 32)
    np.testing.assert_array_equal(route.sum(axis=0), counts)


def test_rows_per_rank_counts_distinct_tokens_per_rank():
    route = np.zeros((4, 8), bool)
    route[0, [0, 1]] = True  # two picks on rank 0: one row
    route[1, [0, 7]] = True  # rank 0 and rank 3
    np.testing.assert_array_equal(rows_per_rank(route, 4), [2, 0, 0, 1])


def test_bad_load_is_refused():
    with pytest.raises(ValueError, match="load='skewed'"):
        RoutingLoad("skewed")
    with pytest.raises(ValueError, match="hot_factor"):
        RoutingLoad("imbalanced", 0.5)
