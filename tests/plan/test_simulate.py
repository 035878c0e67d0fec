"""A simulated step against counts made without it: parameter, gradient and Adam bytes from the
analytic parameter count (tools/dry_run.py), all-to-all bytes from the routing arithmetic."""

from __future__ import annotations

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.plan.simulate import SimSettings, psr_step_for, simulated_microbatches
from rexmoe_train.plan.worker import run_jobs
from rexmoe_train.tools.dry_run import parameter_counts


def test_simulated_microbatches_reach_the_schedule_peak():
    assert simulated_microbatches(16, 1, None) == 1
    assert simulated_microbatches(1, 1, None) == 1
    assert simulated_microbatches(16, 4, None) == 4
    assert simulated_microbatches(12, 4, 2) == 12  # interleaved: pp*vpp + pp = 12
    assert simulated_microbatches(15, 2, None) == 3  # a divisor of the step's count


def test_psr_steps():
    cfg = compose_experiment(["rexmoe.psr.schedule=linear", "rexmoe.psr.start_step=50",
                              "rexmoe.psr.end_step=150"]).experiment
    assert psr_step_for(cfg, "N") == 50 and psr_step_for(cfg, "rN") == 150


@pytest.mark.slow
def test_tiny_ep2_step_matches_independent_counts():
    cfg = compose_experiment(["parallel.expert_model_parallel_size=2"]).experiment
    cfg.train.bf16 = False
    [trace] = run_jobs(cfg, 2, [(0, SimSettings(spec="te"))])
    counts = parameter_counts(cfg, 257)
    local_params = counts["total"] - counts["experts"] // 2  # ep=2 holds half of every bank
    cats = trace.by_category
    assert cats["parameters"] == 4 * local_params
    assert cats["gradients"] == 4 * local_params  # fp32 grad buffer
    # Adam's m and v in fp32, plus torch Adam's 0-d fp32 step counter per parameter tensor
    steps = cats["optimizer_state"] - 8 * local_params
    assert 0 < steps < 4096 and steps % 4 == 0
    assert trace.peak_bytes >= sum(cats.values()) - cats.get("temporaries", 0)
    # all-to-all: each of 4 MoE layers sends half of its T*k token copies to the other rank in the
    # dispatch, the combine, and their two backward passes; the probs go over once each way
    m, t = cfg.model, cfg.train
    half = t.micro_batch_size * t.seq_length * m.moe_router_topk // 2
    per_layer = 4 * half * m.hidden_size * 4 + 2 * half * 4
    traffic = trace.traffic_by_kind()
    assert traffic["expert_all_to_all"]["sent"] == 4 * per_layer
    assert traffic["expert_all_to_all"]["received"] == 4 * per_layer
    assert traffic["dp_all_reduce"]["sent"] > 0
    assert trace.total_flops() > 0


@pytest.mark.slow
def test_dedup_dispatcher_sends_fewer_bytes_than_alltoall():
    traces = {}
    for dispatcher in ("alltoall", "rexmoe_dedup"):
        cfg = compose_experiment(["parallel.expert_model_parallel_size=2",
                                  f"parallel.moe_token_dispatcher_type={dispatcher}"]).experiment
        cfg.train.bf16 = False
        [traces[dispatcher]] = run_jobs(cfg, 2, [(0, SimSettings(spec="te"))])
    stock = traces["alltoall"].traffic_by_kind()
    dedup = traces["rexmoe_dedup"].traffic_by_kind()
    # top-2 of 32 candidates over 2 ranks: a token's two copies often share a rank, sent once
    assert dedup["expert_all_to_all"]["sent"] < 0.8 * stock["expert_all_to_all"]["sent"]
    assert dedup["dp_all_reduce"] == stock["dp_all_reduce"]
    assert traces["rexmoe_dedup"].by_category["parameters"] == traces["alltoall"].by_category["parameters"]


def test_module_label_names_the_innermost_module_without_indices():
    from rexmoe_train.plan.simulate import module_label

    top = "DistributedDataParallel.module.module"
    layer = [f"{top}.decoder", f"{top}.decoder.layers.3", f"{top}.decoder.layers.3.mlp"]
    assert module_label({"Global", top, *layer, f"{top}.decoder.layers.3.mlp.router"}) == "layer.mlp.router"
    # an expert bank is registered on the model, not in the layer that calls it: the inner call wins
    bank = [f"{top}.expert_banks", f"{top}.expert_banks.1", f"{top}.expert_banks.1.local_experts.7"]
    assert module_label({"Global", top, *layer, *bank}) == "expert_banks.local_experts"
    assert module_label({"Global", top, f"{top}.output_layer"}) == "module.output_layer"
    assert module_label({"Global"}) == "outside any module"
    assert module_label({"Global", top}).startswith("model (top level")
