"""Planning a config end to end (``make_plan``), and the smallest change that fits when it does not.

The grid, smallest change first: halve the micro-batch (global batch kept: more micro-batches),
selective recompute of the MoE layer, full recompute (uniform, one layer), then twice the pipeline
or expert-parallel size (at twice the world size, same data-parallel size). Each candidate is
simulated (its worst rank class and load only) and shown with its peak; the first that fits is the
suggestion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.config.schema import ConfigError, ExperimentConfig
from rexmoe_train.plan.planner import (
    Case,
    PlanOptions,
    cases_for,
    for_target,
    simulate_cases,
    smallest_world_size,
    summarize,
    usable_bytes,
    verdict,
)
from rexmoe_train.plan.worker import SimulationError


class PlanInputError(ValueError):
    """Bad planner input: the message is one line naming the field."""


def compose(overrides: Sequence[str], gpu: str) -> ExperimentConfig:
    return for_target(compose_experiment(list(overrides)).experiment, gpu)


def check_inputs(overrides: Sequence[str], options: PlanOptions) -> tuple[ExperimentConfig, int]:
    """Compose and validate; every problem is a PlanInputError naming the field."""
    from rexmoe_train.plan import hardware
    from rexmoe_train.plan.planner import SPECS

    if options.spec not in SPECS:
        raise PlanInputError(f"--spec={options.spec!r}: must be one of {', '.join(SPECS)}")
    try:
        hardware.get_gpu(options.gpu)
    except ValueError as err:
        raise PlanInputError(f"--gpu: {err}") from None
    try:
        cfg = compose(overrides, options.gpu)
    except ConfigError as err:
        raise PlanInputError(str(err)) from None
    world = options.world_size or smallest_world_size(cfg)
    if world < 1:
        raise PlanInputError(f"--world-size={world}: must be >= 1")
    try:
        cfg.validate(world)
    except ConfigError as err:
        message = str(err)
        if options.world_size is not None and "world size" in message:
            message = f"--world-size={world}: {message.removeprefix('config error: ')}"
        raise PlanInputError(message) from None
    return cfg, world


def padded_vocab(cfg: ExperimentConfig) -> int:
    from rexmoe_train.plan.simulate import BYTE_VOCAB

    return cfg.padded_vocab_size(cfg.model.vocab_size or BYTE_VOCAB)


def make_plan(overrides: Sequence[str], options: PlanOptions, runner: Optional[Callable] = None,
              log: Callable[[str], None] = lambda _: None) -> dict:
    """Simulate every distinct rank of the config and return the plan's JSON object."""
    cfg, world = check_inputs(overrides, options)
    cases = cases_for(cfg, world, options)
    log(f"[plan] {len(cases)} simulation(s) at world size {world}: "
        + ", ".join(f"ranks {c.ranks[0]}-{c.ranks[-1]} {c.load.kind} {c.psr_stage}" for c in cases))
    simulate_cases(cfg, world, cases, options.spec, runner)
    result = summarize(cfg, world, options, cases, padded_vocab(cfg))
    if result["verdict"] != "fits" and options.suggest:
        worst = max(cases, key=lambda c: c.trace.peak_bytes)
        log(f"[plan] {result['verdict']}: peak {result['peak_bytes'] / 1024 ** 3:.2f} GiB; searching for a change")
        try:
            result["suggestion"] = suggest(overrides, cfg, world, options, worst, runner, log)
        except SimulationError as err:  # the plan itself stands; say why there is no suggestion
            result["suggestion"] = {"change": None, "tried": [], "error": str(err)}
    return result


# -------------------------------------------------------------------------------------------------
def candidates(cfg: ExperimentConfig, world: int) -> list[tuple[str, list[str], int]]:
    """(description, extra overrides, world size), smallest change first."""
    out = []
    m, p, t = cfg.model, cfg.parallel, cfg.train
    mbs = t.micro_batch_size
    while mbs > 1:
        mbs //= 2
        out.append((f"train.micro_batch_size={mbs}", [f"train.micro_batch_size={mbs}"], world))
    if m.recompute_granularity is None and m.num_moe_experts:
        out.append(("selective recompute of the MoE layers (recompute_modules=[moe])",
                    ["model.recompute_granularity=selective", "model.recompute_modules=[moe]"], world))
    if m.recompute_granularity != "full":
        out.append(("full recompute, uniform, 1 layer",
                    ["model.recompute_granularity=full", "model.recompute_method=uniform",
                     "model.recompute_num_layers=1", "model.recompute_modules=null"], world))
    out.append((f"parallel.pipeline_model_parallel_size={2 * p.pipeline_model_parallel_size} at world "
                f"size {2 * world}", [f"parallel.pipeline_model_parallel_size={2 * p.pipeline_model_parallel_size}"],
                2 * world))
    if m.num_moe_experts and m.num_moe_experts % (2 * p.expert_model_parallel_size) == 0:
        out.append((f"parallel.expert_model_parallel_size={2 * p.expert_model_parallel_size} at world "
                    f"size {2 * world}", [f"parallel.expert_model_parallel_size={2 * p.expert_model_parallel_size}"],
                    2 * world))
    return out


def suggest(overrides: Sequence[str], cfg: ExperimentConfig, world: int, options: PlanOptions,
            worst: Case, runner: Optional[Callable], log: Callable[[str], None]) -> dict:
    """Try the grid in order on the worst case; the first candidate that fits is the suggestion."""
    usable = usable_bytes(options.gpu)
    tried = []
    for description, extra, cand_world in candidates(cfg, world):
        try:
            cand_cfg = compose([*overrides, *extra], options.gpu)
            cand_cfg.validate(cand_world)
        except ConfigError as err:
            tried.append({"change": description, "overrides": extra, "skipped": str(err)})
            continue
        classes = cases_for(cand_cfg, cand_world, options)
        # the candidate's counterpart of the worst case: same load and PSR stage, the same stage
        # position (first / last stage) when the pipeline changes
        same = [c for c in classes if c.load == worst.load and c.psr_stage == worst.psr_stage]
        pick = same[-1] if worst.ranks[-1] == world - 1 else same[0]
        log(f"[plan] trying {description}")
        simulate_cases(cand_cfg, cand_world, [pick], options.spec, runner)
        judged = verdict(pick.trace.peak_bytes, usable, options.headroom)
        tried.append({"change": description, "overrides": extra, "world_size": cand_world,
                      "peak_bytes": pick.trace.peak_bytes, "verdict": judged["verdict"]})
        if judged["verdict"] == "fits":
            return {"change": description, "overrides": extra, "world_size": cand_world,
                    "peak_bytes": pick.trace.peak_bytes, "tried": tried}
    return {"change": None, "tried": tried}
