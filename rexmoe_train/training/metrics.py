"""Per-step training metrics gathered from all ranks: balance losses, router load, PSR.

Every rank runs the same collectives in the same order (fixed names, fixed shapes), so a pipeline
stage without MoE layers still takes part. Values are summed over the whole world: a layer's numbers
are non-zero only on the ranks of its stage, and within a stage the TP (sequence-parallel) and DP ranks
route disjoint tokens, so a world sum is the global count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from rexmoe_train import platform

platform.setup()  # before megatron: it binds torch.cuda names at import

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker  # noqa: E402

from rexmoe_train.model.balance import load_violation  # noqa: E402
from rexmoe_train.model.psr import PSRSchedule, psr_allowed_mask  # noqa: E402
from rexmoe_train.model.reuse import ReusePlan  # noqa: E402

BALANCE_TERMS = ("load_balancing_loss", "group_load_balancing_loss", "z_loss")


def init_aux_loss_tracker(num_layers: int) -> None:
    """Create megatron's tracker entries on every rank so the reductions line up."""
    tracker = get_moe_layer_wise_logging_tracker()
    for name in BALANCE_TERMS:
        tracker.setdefault(name, {"values": torch.zeros(num_layers, device=platform.device()),
                                  "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False})


def balance_losses(cfg, num_microbatches: int) -> dict[str, float]:
    """Mean per MoE layer of each balance term for this step (unscaled), and their weighted total.

    Router-side, each rank saved its partial term per micro-batch: the switch losses are partial sums
    over its tokens (to be summed over TP/CP ranks, and over DP too for global-batch scope, else
    averaged over DP); the z-loss is a per-rank mean (averaged over the stage's ranks).
    """
    tracker = get_moe_layer_wise_logging_tracker()
    dp = parallel_state.get_data_parallel_world_size()
    ranks_per_stage = dist.get_world_size() // parallel_state.get_pipeline_model_parallel_world_size()
    b = cfg.rexmoe.balance
    divisors = {
        "load_balancing_loss": 1 if b.layer_aux_scope == "global_batch" else dp,
        "group_load_balancing_loss": 1 if b.group_aux_scope == "global_batch" else dp,
        "z_loss": ranks_per_stage,
    }
    coeffs = {"load_balancing_loss": b.layer_aux_coeff, "group_load_balancing_loss": b.group_aux_coeff,
              "z_loss": b.z_loss_coeff}
    stacked = torch.stack([tracker[name]["values"] for name in BALANCE_TERMS]).float()
    dist.all_reduce(stacked)
    plan = ReusePlan.from_config(cfg)
    out, total = {}, 0.0
    for row, name in zip(stacked, BALANCE_TERMS):
        per_layer = row / (divisors[name] * num_microbatches)
        # group losses are logged once per group (by its last layer); others once per MoE layer
        count = len(plan.groups) if name == "group_load_balancing_loss" else plan.num_moe_layers
        value = float(per_layer.sum()) / max(count, 1)
        out[name] = value
        total += coeffs[name] * value * count
    for name in BALANCE_TERMS:
        tracker[name]["values"].zero_()
    out["aux_loss"] = total
    return out


def router_load(cfg, routers: list, step: int) -> dict:
    """Global tokens per candidate for this step -> per-layer and per-group MaxVio, PSR candidates."""
    plan = ReusePlan.from_config(cfg)
    width = plan.reuse_group_size * plan.experts_per_layer
    load = torch.zeros(plan.num_moe_layers, width, dtype=torch.float64, device=platform.device())
    for router in routers:
        load[router.moe_layer, : router.step_load.numel()] = router.step_load
    dist.all_reduce(load)
    load = load.cpu()
    psr = cfg.rexmoe.psr
    layer_vio, group_vio, candidates = [], [], None
    for group in plan.groups:
        schedule = PSRSchedule(psr.schedule, group.experts_per_layer, group.size, psr.start_step, psr.end_step)
        candidates = candidates or schedule.num_candidates(step)
        protect = None
        for moe_layer in group.moe_layers:
            if psr.protect_local:
                protect = group.local_candidates(moe_layer)
            allowed = psr_allowed_mask(schedule, step, cfg.psr_seed, moe_layer, protect)
            layer_vio.append(round(load_violation(load[moe_layer, : group.num_candidates], allowed), 4))
        pooled = load[list(group.moe_layers), : group.num_candidates].sum(dim=0)
        group_vio.append(round(load_violation(pooled), 4))
    return {"psr_candidates": candidates, "load_violation_max": layer_vio,
            "group_load_violation_max": group_vio}
