"""ReusePlan: the spec's indexing (MoE layers from 0, dense excluded; candidate c = (g*r + c//N, c%N))."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ConfigError
from rexmoe_train.model.reuse import ReusePlan


def test_groups_and_candidates_with_dense_first_layers():
    plan = ReusePlan(num_layers=10, first_k_dense_layers=2, reuse_group_size=4, experts_per_layer=8)
    assert plan.num_moe_layers == 8
    assert [(g.first_moe_layer, g.size) for g in plan.groups] == [(0, 4), (4, 4)]
    assert not plan.is_moe_layer(2) and plan.moe_index(3) == 0 and plan.moe_index(10) == 7
    g1 = plan.group_of(5)
    assert g1.index == 1 and g1.num_candidates == 32
    assert g1.candidate(0) == (4, 0) and g1.candidate(13) == (5, 5) and g1.candidate(31) == (7, 7)
    assert list(g1.local_candidates(6)) == list(range(16, 24))
    with pytest.raises(IndexError):
        g1.candidate(32)


def test_partial_last_group():
    plan = ReusePlan(32, 0, 3, 64, allow_partial_last_group=True)
    sizes = [g.size for g in plan.groups]
    assert sizes == [3] * 10 + [2] and plan.groups[-1].num_candidates == 128


@pytest.mark.parametrize("pp,vpp,ok", [(2, None, True), (4, None, False), (2, 2, False), (1, None, True)])
def test_pipeline_boundaries_on_groups(pp, vpp, ok):
    plan = ReusePlan(8, 0, 4, 8)
    if ok:
        plan.check_pipeline_split(pp, vpp)
    else:
        with pytest.raises(ConfigError, match="inside reuse group"):
            plan.check_pipeline_split(pp, vpp)


def test_dense_first_layers_shift_boundaries():
    # 2 dense + 8 MoE (r=4), pp=2: 5 layers per stage -> stage 1 starts at MoE layer 3: inside group 0
    with pytest.raises(ConfigError, match="stage 1"):
        ReusePlan(10, 2, 4, 8).check_pipeline_split(2)
    # 2 dense + 6 MoE (r=2), pp=2: stage 1 starts at layer 5 = MoE layer 2, a group boundary
    ReusePlan(8, 2, 2, 8).check_pipeline_split(2)
