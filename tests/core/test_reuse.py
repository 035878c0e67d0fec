"""ReusePlan: the spec's indexing (MoE layers from 0, dense excluded; candidate c = (g*r + c//N, c%N))."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ConfigError
from rexmoe_train.core.reuse import ReusePlan


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


# (num_layers, pp, vpp, first, last): even and uneven splits megatron accepts
SPLITS = [(8, 2, None, None, None), (8, 2, 2, None, None), (12, 3, None, 2, None), (12, 3, None, None, 2),
          (12, 3, None, 2, 2), (12, 4, None, 3, 3), (16, 3, 2, 4, 4), (16, 2, 2, 4, None), (10, 2, None, 4, 6)]


@pytest.mark.parametrize("num_layers,pp,vpp,first,last", SPLITS)
def test_pipeline_chunks_match_megatron(num_layers, pp, vpp, first, last):
    """Our config-time split is megatron's (get_transformer_layer_offset / get_num_layers_to_build)."""
    from rexmoe_train import compat, platform

    compat.install()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from rexmoe_train.core.reuse import pipeline_chunks

    tc = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                           pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                           num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                           pipeline_dtype=__import__("torch").float32, **platform.transformer_config_overrides())
    expected = sorted(
        (get_transformer_layer_offset(tc, vp_stage=v if vpp else None, pp_rank=stage), stage,
         get_num_layers_to_build(tc, vp_stage=v if vpp else None, pp_rank=stage))
        for v in range(vpp or 1) for stage in range(pp))
    got = pipeline_chunks(num_layers, pp, vpp, first, last)
    assert [(offset, stage, count) for stage, offset, count in got] == expected
    assert sum(count for _, _, count in got) == num_layers


def test_uneven_pipeline_stages_must_fall_on_groups():
    plan = ReusePlan(num_layers=12, first_k_dense_layers=0, reuse_group_size=2, experts_per_layer=8)
    plan.check_pipeline_split(3, None, 2, 2)  # 2 | 8 | 2 layers: boundaries at 2 and 10
    plan.check_pipeline_split(2, None, 4, None)  # 4 | 8
    with pytest.raises(ConfigError, match=r"stage 1 \(model chunk 1\) would start at layer 4, inside "
                                          r"reuse group 1 .*layers per chunk: \[3, 9\]"):
        plan.check_pipeline_split(2, None, 3, None)
    dense = ReusePlan(num_layers=13, first_k_dense_layers=1, reuse_group_size=4, experts_per_layer=8)
    dense.check_pipeline_split(2, None, 5, None)  # dense + one group of 4 | two groups
    with pytest.raises(ConfigError, match="inside reuse group 0"):
        dense.check_pipeline_split(2, None, 4, None)


@pytest.mark.parametrize("args,field", [
    ((2, None, 0, None), "num_layers_in_first_pipeline_stage=0"),
    ((2, 2, 3, None), "num_layers_in_first_pipeline_stage=3: must be >= 1 and divisible by"),
    ((1, None, None, 4), "num_layers_in_last_pipeline_stage=4: needs parallel.pipeline_model_parallel_size >= 2"),
    ((4, None, 3, 4), "the other 2 stage\\(s\\) must share the remaining 5"),
    ((2, None, 4, 4), "the other 0 stage\\(s\\) must share the remaining 4"),
])
def test_uneven_pipeline_bad_values_are_one_line(args, field):
    plan = ReusePlan(num_layers=12, first_k_dense_layers=0, reuse_group_size=1, experts_per_layer=8)
    with pytest.raises(ConfigError, match=field) as err:
        plan.check_pipeline_split(*args)
    assert "\n" not in str(err.value)
