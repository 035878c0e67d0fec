"""The plan of one config: which ranks to simulate, the verdict, the suggestion, the JSON object.

Ranks identical by construction share one simulation: under a balanced load every rank of a
pipeline stage builds the same shapes (tensor / expert / data-parallel positions differ only in
which slice they hold), so one rank per stage is simulated, and stands for the stage. The
imbalanced case simulates the same ranks holding the hottest expert: a bound for every rank of the
stage (any of them may hold it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.plan.load import RoutingLoad
from rexmoe_train.plan.records import RankTrace
from rexmoe_train.plan.simulate import SimSettings, psr_step_for

SPECS = ("te", "local")
DEFAULT_HOT_FACTOR = 2.0  # the imbalanced case: hottest expert at 2x the mean (MaxVio 1.0)
GIB = 1024 ** 3


@dataclass
class PlanOptions:
    world_size: Optional[int] = None  # None: the smallest the layout allows
    gpu: str = "h100-sxm"
    spec: str = "te"
    hot_factor: float = DEFAULT_HOT_FACTOR  # <= 1: no imbalanced case
    suggest: bool = True
    headroom: float = 0.0  # the verdict's margin that must stay free (0.1: 10 % of usable memory)


@dataclass
class Case:
    """One simulation: a rank class at a load and PSR stage."""

    ranks: list[int]
    load: RoutingLoad
    psr_stage: str
    trace: Optional[RankTrace] = None
    extra: dict = field(default_factory=dict)


def smallest_world_size(cfg: ExperimentConfig) -> int:
    """The smallest world size the parallel layout divides (dense and expert layouts alike)."""
    p = cfg.parallel
    dense = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    expert = p.expert_tensor_parallel_size * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    return dense * expert // math.gcd(dense, expert)


def rank_classes(cfg: ExperimentConfig, world_size: int) -> list[list[int]]:
    """Ranks grouped by pipeline stage (megatron's default order tp-cp-ep-dp-pp: pp is outermost)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    per_stage = world_size // pp
    return [list(range(s * per_stage, (s + 1) * per_stage)) for s in range(pp)]


def psr_stages(cfg: ExperimentConfig) -> list[str]:
    """"N" and "rN" when PSR ramps the candidates during the run, else only "rN" (all open)."""
    psr, r = cfg.rexmoe.psr, cfg.rexmoe.reuse_group_size
    ramps = psr.schedule != "none" and r > 1 and cfg.model.num_moe_experts
    return ["N", "rN"] if ramps else ["rN"]


def for_target(cfg: ExperimentConfig, gpu: str) -> ExperimentConfig:
    """The config as the target device runs it: bf16 on a GPU unless train.bf16 says otherwise, and
    ``model.moe_grouped_gemm=auto`` resolved as the target resolves it (grouped on a GPU, the
    SequentialMLP loop on a CPU). Resolved here, not in the simulating process: this CPU would pick the
    loop, whose backward frees one expert's intermediates at a time where the grouped bank (and TE's
    TEGroupedMLP) holds all of them at once (18.7b_se, full recompute: 1.85 vs 5.56 GiB)."""
    on_gpu = gpu != "cpu"
    if cfg.train.bf16 is None:
        cfg.train.bf16 = on_gpu
    if cfg.model.moe_grouped_gemm == "auto":
        cfg.model.moe_grouped_gemm = on_gpu
    return cfg


def cases_for(cfg: ExperimentConfig, world_size: int, options: PlanOptions) -> list[Case]:
    loads = [RoutingLoad("balanced")]
    if cfg.model.num_moe_experts and options.hot_factor > 1.0:
        loads.append(RoutingLoad("imbalanced", options.hot_factor))
    return [Case(ranks, load, stage) for ranks in rank_classes(cfg, world_size)
            for load in loads for stage in psr_stages(cfg)]


def simulate_cases(cfg: ExperimentConfig, world_size: int, cases: Sequence[Case], spec: str,
                   runner: Optional[Callable] = None) -> None:
    from rexmoe_train.plan.worker import run_jobs

    runner = runner or run_jobs
    jobs = [(case.ranks[0], SimSettings(spec=spec, load=case.load, psr_step=psr_step_for(cfg, case.psr_stage)))
            for case in cases]
    for case, trace in zip(cases, runner(cfg, world_size, jobs)):
        trace.ranks = list(case.ranks)
        case.trace = trace


def usable_bytes(gpu_name: str) -> int:
    from rexmoe_train.plan import hardware

    return hardware.usable_memory_bytes(hardware.get_gpu(gpu_name))


def verdict(peak: int, usable: int, headroom: float = 0.0) -> dict:
    """fits / does not fit, with the margin (bytes and share of the usable memory)."""
    margin = usable - peak
    fits = peak <= usable * (1.0 - headroom)
    return {"verdict": "fits" if fits else "does not fit", "usable_bytes": usable, "margin_bytes": margin,
            "margin_fraction": round(margin / usable, 4) if usable else None}


def step_time(cfg: ExperimentConfig, world_size: int, traces: list[RankTrace], gpu_name: str,
              padded_vocab: int) -> dict:
    """P2's step-time model (plan/timing.py); {"available": False} when it is missing."""
    try:
        from rexmoe_train.plan import hardware, timing
    except ImportError:
        return {"available": False}
    if not any(t.ops for t in traces):
        return {"available": False, "reason": "no traced operations"}
    dtype = "bf16" if cfg.train.bf16 else "fp32"
    layout = timing.Layout.from_experiment(cfg, world_size)
    model_flops = timing.model_flops_per_step(cfg, padded_vocab)
    out = timing.estimate_step_time(traces, layout, hardware.get_gpu(gpu_name), dtype, model_flops=model_flops)
    out["available"] = True
    return out


# -------------------------------------------------------------------------------------------------
def assumptions(cfg: ExperimentConfig, options: PlanOptions, cases: Sequence[Case]) -> dict:
    spec = ("te: megatron's local layer spec with torch's fused scaled_dot_product_attention (no "
            "[b, heads, s, s] scores kept, as TE's fused attention); TE's fused LayerNorm+Linear is "
            "not emulated (local norms)"
            if options.spec == "te" else
            "local: megatron's local layer spec as a GPU without Transformer Engine runs it (attention "
            "scores and softmax kept for backward)")
    sims = [c.trace.meta for c in cases if c.trace is not None]
    mb = sims[0] if sims else {}
    return {
        "layer_spec": spec,
        "routing_loads": sorted({c.load.describe() for c in cases}),
        "psr_stages": sorted({f"{c.psr_stage}: step {psr_step_for(cfg, c.psr_stage)}" for c in cases}),
        "dtype": "bf16 (Float16Module), fp32 grads and Adam state" if cfg.train.bf16 else "fp32",
        "experts": ("grouped bank (one grouped GEMM per projection, as a GPU runs model.moe_grouped_gemm="
                    "auto; the nearest a CPU runs to TE's TEGroupedMLP)" if cfg.model.resolved_moe_grouped_gemm()
                    else "SequentialMLP loop (one expert after another)"),
        "dispatcher": cfg.parallel.moe_token_dispatcher_type,
        "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
        "device": "fake CPU tensors (FakeTensorMode) under torch's fake process group; memory by "
                  "torch's MemTracker; a GPU run adds the CUDA context and allocator slack "
                  "(plan/hardware.py usable_memory_bytes)",
        "micro_batches": (f"{mb.get('microbatches_simulated')} of {mb.get('microbatches_per_step')} per "
                          "step simulated (enough to reach the schedule's memory peak); the "
                          "micro-batch ops and traffic scaled to the step"),
        "ranks": "one simulated rank per pipeline stage stands for the stage (identical shapes under a "
                 "balanced load; the imbalanced case puts the hottest expert on the simulated rank)",
        "optimizer_state": "Adam moments created before the step (a later step's peak)",
        "host_reads": "grad-norm / found-inf values read in the optimizer step answered with 1.0 / 0 "
                      f"({sum(m.get('host_reads_answered', 0) for m in sims)} reads); they decide no shape",
    }


def summarize(cfg: ExperimentConfig, world_size: int, options: PlanOptions, cases: list[Case],
              padded_vocab: int) -> dict:
    """The JSON object (cli/plan.py prints it as a table)."""
    per_rank = [{"ranks": c.ranks, "load": c.load.kind, "psr_stage": c.psr_stage,
                 "peak_bytes": c.trace.peak_bytes, "by_category": c.trace.by_category,
                 "activations_by_module": c.trace.activations_by_module,
                 "traffic": c.trace.traffic_by_kind(), "simulated_rank": c.ranks[0],
                 "wall_s": c.trace.meta.get("wall_s")} for c in cases]
    peak = max(c.trace.peak_bytes for c in cases)
    usable = usable_bytes(options.gpu)
    judged = verdict(peak, usable, options.headroom)
    balanced = [c for c in cases if c.load.kind == "balanced" and c.psr_stage == "rN"]
    traffic: dict[str, dict[str, int]] = {}
    for c in balanced:
        for kind, moved in c.trace.traffic_by_kind().items():
            slot = traffic.setdefault(kind, {"sent": 0, "received": 0})
            slot["sent"] = max(slot["sent"], moved["sent"])
            slot["received"] = max(slot["received"], moved["received"])
    timing = step_time(cfg, world_size, [c.trace for c in balanced], options.gpu, padded_vocab)
    return {
        "verdict": judged["verdict"],
        "gpu": options.gpu,
        "world_size": world_size,
        "spec": options.spec,
        "peak_bytes": peak,
        "usable_bytes": usable,
        "margin_bytes": judged["margin_bytes"],
        "margin_fraction": judged["margin_fraction"],
        "headroom_required": options.headroom,
        "per_rank": per_rank,
        "traffic_bytes_per_step": traffic,
        "step_time_s": timing.get("step_time_s"),
        "mfu": timing.get("mfu"),
        "time": {k: v for k, v in timing.items() if k not in ("per_rank",)},
        "suggestion": None,
        "assumptions": assumptions(cfg, options, cases),
    }
