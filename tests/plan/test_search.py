"""Planner input checks and the search for the smallest change that fits (the simulation itself is
replaced by a stand-in whose peak grows with the micro-batch: the search logic alone is tested here;
tests/plan/test_simulate.py and test_measure.py test the simulation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.plan.planner import PlanOptions, usable_bytes
from rexmoe_train.plan.records import RankTrace
from rexmoe_train.plan.search import PlanInputError, candidates, check_inputs, make_plan

GIB = 1024 ** 3


def test_candidates_smallest_change_first():
    cfg = compose_experiment(["train.micro_batch_size=4"]).experiment
    names = [c[0] for c in candidates(cfg, 2)]
    assert names[:2] == ["train.micro_batch_size=2", "train.micro_batch_size=1"]
    assert any("selective" in n for n in names) and any("full recompute" in n for n in names)
    assert names[-2].startswith("parallel.pipeline_model_parallel_size=2 at world size 4")
    assert names[-1].startswith("parallel.expert_model_parallel_size=2 at world size 4")


@pytest.mark.parametrize("overrides, options, message", [
    ([], PlanOptions(gpu="v100"), "--gpu"),
    ([], PlanOptions(spec="xla"), "--spec='xla'"),
    (["parallel.expert_model_parallel_size=2"], PlanOptions(world_size=3), "--world-size=3"),
    (["rexmoe.gating=softmax"], PlanOptions(), "rexmoe.gating"),
])
def test_bad_inputs_name_the_field(overrides, options, message):
    with pytest.raises(PlanInputError, match=message.replace("[", r"\[")):
        check_inputs(overrides, options)


def test_default_world_size_is_the_smallest():
    cfg, world = check_inputs(["parallel.expert_model_parallel_size=2"], PlanOptions())
    assert world == 2 and cfg.train.bf16 is True  # planned for the GPU: bf16


def _runner_peak_by_micro_batch(cfg, world, jobs):
    """Stand-in simulation: 1 GiB per sample of the micro-batch."""
    peak = cfg.train.micro_batch_size * GIB
    return [RankTrace(ranks=[rank], peak_bytes=peak, by_category={"activations": peak}) for rank, _ in jobs]


def test_suggestion_is_the_first_candidate_that_fits():
    usable = usable_bytes("cpu")
    too_big = 2 * usable // GIB  # micro-batch that needs twice the usable memory
    result = make_plan([f"train.micro_batch_size={too_big}", f"train.global_batch_size={too_big}"],
                       PlanOptions(gpu="cpu", hot_factor=1.0), runner=_runner_peak_by_micro_batch)
    assert result["verdict"] == "does not fit"
    suggestion = result["suggestion"]
    assert suggestion["change"] == f"train.micro_batch_size={too_big // 2}"
    assert [t["peak_bytes"] for t in suggestion["tried"]] == [too_big // 2 * GIB]


def test_no_suggestion_when_it_fits():
    result = make_plan(["train.micro_batch_size=1", "train.global_batch_size=1"],
                       PlanOptions(gpu="cpu", hot_factor=1.0), runner=_runner_peak_by_micro_batch)
    assert result["verdict"] == "fits" and result["suggestion"] is None


PAPER_MODELS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "model").glob("rexmoe_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_packaged_paper_models_fit_an_h100_with_10_percent_headroom(model):
    """The issue's promise: every packaged paper recipe fits at its packaged layout, TE spec."""
    result = make_plan([f"model={model}"], PlanOptions(gpu="h100-sxm", spec="te", hot_factor=1.0,
                                                        suggest=False, headroom=0.1))
    assert result["verdict"] == "fits", (model, result["peak_bytes"] / GIB)


def test_a_failed_suggestion_search_keeps_the_plan():
    from rexmoe_train.plan.worker import SimulationError

    calls = []

    def runner(cfg, world, jobs):
        calls.append(cfg.train.micro_batch_size)
        if len(calls) > 1:
            raise SimulationError("simulation failed (exit -9): killed")
        return _runner_peak_by_micro_batch(cfg, world, jobs)

    too_big = 2 * usable_bytes("cpu") // GIB
    result = make_plan([f"train.micro_batch_size={too_big}", f"train.global_batch_size={too_big}"],
                       PlanOptions(gpu="cpu", hot_factor=1.0), runner=runner)
    assert result["verdict"] == "does not fit" and result["peak_bytes"] == too_big * GIB
    assert result["suggestion"]["change"] is None and "killed" in result["suggestion"]["error"]
