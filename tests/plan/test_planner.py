"""Which ranks are simulated, for which loads and PSR stages, and the verdict's arithmetic."""

from __future__ import annotations

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.plan.planner import (
    PlanOptions,
    cases_for,
    for_target,
    psr_stages,
    rank_classes,
    smallest_world_size,
    verdict,
)


def _cfg(*overrides):
    return compose_experiment(list(overrides)).experiment


def test_smallest_world_size_is_what_both_layouts_divide():
    assert smallest_world_size(_cfg()) == 1
    assert smallest_world_size(_cfg("parallel.expert_model_parallel_size=2")) == 2
    cfg = _cfg("parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=4",
               "parallel.expert_tensor_parallel_size=1")
    assert smallest_world_size(cfg) == 4


def test_one_rank_class_per_pipeline_stage():
    cfg = _cfg("parallel.pipeline_model_parallel_size=2", "model.num_layers=8", "rexmoe.reuse_group_size=2")
    assert rank_classes(cfg, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_cases_cover_loads_and_psr_stages():
    cfg = _cfg("rexmoe.psr.schedule=linear", "rexmoe.psr.start_step=10", "rexmoe.psr.end_step=20")
    assert psr_stages(cfg) == ["N", "rN"]
    cases = cases_for(cfg, 1, PlanOptions())
    assert {(c.load.kind, c.psr_stage) for c in cases} == {
        ("balanced", "N"), ("balanced", "rN"), ("imbalanced", "N"), ("imbalanced", "rN")}
    assert len(cases_for(cfg, 1, PlanOptions(hot_factor=1.0))) == 2
    assert psr_stages(_cfg("rexmoe.psr.schedule=none")) == ["rN"]


def test_target_precision():
    assert for_target(_cfg(), "h100-sxm").train.bf16 is True
    assert for_target(_cfg(), "cpu").train.bf16 is False
    assert for_target(_cfg("train.bf16=false"), "h100-sxm").train.bf16 is False
    # the expert bank as the target picks it: grouped on a GPU, the loop on a CPU, an explicit choice kept
    assert for_target(_cfg(), "h100-sxm").model.resolved_moe_grouped_gemm() is True
    assert for_target(_cfg(), "cpu").model.resolved_moe_grouped_gemm() is False
    assert for_target(_cfg("model.moe_grouped_gemm=false"), "h200").model.resolved_moe_grouped_gemm() is False


def test_verdict_margin_and_headroom():
    assert verdict(70, 100)["verdict"] == "fits"
    assert verdict(70, 100)["margin_bytes"] == 30 and verdict(70, 100)["margin_fraction"] == 0.3
    assert verdict(95, 100, headroom=0.1)["verdict"] == "does not fit"
    assert verdict(101, 100)["verdict"] == "does not fit"
