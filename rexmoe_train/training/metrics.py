"""Per-step training metrics gathered from all ranks: balance losses, router load, PSR.

Every rank runs the same collectives in the same order (fixed names, fixed shapes), so a pipeline
stage without MoE layers still takes part. Values are summed over the whole world: a layer's numbers
are non-zero only on the ranks of its stage, and within a stage the TP (sequence-parallel) and DP ranks
route disjoint tokens, so a world sum is the global count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

from rexmoe_train import platform
from rexmoe_train.core.psr import PSRSchedule, psr_allowed_mask
from rexmoe_train.model.balance import load_violation

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
    plan = cfg.reuse_plan()
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


UNDER_USED_SHARE = 0.1  # a candidate is under-used below 10% of the uniform share of its router


def load_entropy(load: torch.Tensor) -> float:
    """Entropy of a router's assignment shares over its available candidates, divided by log(count):
    1 = every candidate equally used, 0 = one candidate takes all (also 0 with < 2 candidates or no
    tokens). A routing-entropy reading from the loads alone, not the per-token gate entropy."""
    load = load.double().flatten()
    total = float(load.sum())
    if load.numel() < 2 or total <= 0:
        return 0.0
    share = load[load > 0] / total
    return float(-(share * share.log()).sum() / torch.log(torch.tensor(float(load.numel()), dtype=torch.float64)))


def router_load(cfg, routers: list, step: int) -> dict:
    """Global tokens per candidate for this step -> per-layer and per-group MaxVio, the fraction of
    under-used candidates, the reuse matrix (how often each router picks each owner layer's experts)
    and the PSR candidate count. On evaluation steps also the raw per-candidate loads (`expert_load`),
    which `rexmoe-plot` draws as heatmaps."""
    plan = cfg.reuse_plan()
    width = plan.reuse_group_size * plan.experts_per_layer
    # one all-reduce: the per-candidate loads, plus a last column of assignments chosen before any
    # capacity drop
    totals = torch.zeros(plan.num_moe_layers, width + 1, dtype=torch.float64, device=platform.device())
    for router in routers:
        totals[router.moe_layer, : router.step_load.numel()] = router.step_load
        totals[router.moe_layer, width] = router.step_routed
    dist.all_reduce(totals)
    totals = totals.cpu()
    load, routed = totals[:, :width], totals[:, width]
    psr, n = cfg.rexmoe.psr, plan.experts_per_layer
    layer_vio, under_used, group_vio, reuse, expert_load, candidates = [], [], [], [], [], None
    entropy = []
    max_share = []
    for group in plan.groups:
        schedule = PSRSchedule(psr.schedule, group.experts_per_layer, group.size, psr.start_step, psr.end_step,
                               psr.mask_draw)
        candidates = candidates or schedule.num_candidates(step)
        group_load = load[list(group.moe_layers), : group.num_candidates]
        protect = None
        for moe_layer, layer_load in zip(group.moe_layers, group_load):
            if psr.protect_local:
                protect = group.local_candidates(moe_layer)
            allowed = psr_allowed_mask(schedule, step, cfg.psr_seed, moe_layer, protect)
            layer_vio.append(round(load_violation(layer_load, allowed), 4))
            available = layer_load[allowed]
            share = available.sum() / max(available.numel(), 1)
            under_used.append(round(float((available < UNDER_USED_SHARE * share).float().mean()), 4))
            entropy.append(round(load_entropy(available), 4))
        pooled = group_load.sum(dim=0)
        group_vio.append(round(load_violation(pooled), 4))
        max_share.append(round(float(pooled.max() / pooled.sum().clamp_min(1)), 4))
        per_owner = group_load.view(group.size, group.size, n).sum(dim=2)  # [router, owner]
        reuse.append((per_owner / per_owner.sum(dim=1, keepdim=True).clamp_min(1)).round(decimals=4).tolist())
        expert_load.append(group_load.long().tolist())
    out = {"psr_candidates": candidates, "load_violation_max": layer_vio,
           "under_used_fraction": under_used, "load_entropy": entropy, "group_load_violation_max": group_vio,
           "group_max_share": max_share,
           "reuse_matrix": reuse}
    if cfg.model.moe_expert_capacity_factor is not None:  # share of assignments dropped, per layer
        out["dropped_fraction"] = [round(float(1 - load[i].sum() / r), 4) if r > 0 else 0.0
                                   for i, r in enumerate(routed.tolist())]
    if step % cfg.train.eval_interval == 0 or step == cfg.train.train_iters:
        out["expert_load"] = expert_load
    return out


def dispatch_bytes(dispatchers: list) -> dict[str, int]:
    """Forward all-to-all bytes of this step, summed over the world (rexmoe_dedup dispatcher only).

    ``dispatch_bytes`` / ``combine_bytes`` are what the dedup dispatcher really sent to other ranks;
    ``stock_*`` what megatron's alltoall would have sent for the same routing (formulas in
    parallel/dispatcher.py). Every rank calls this (a stage without MoE layers passes []), then the
    counters are reset for the next step.
    """
    from rexmoe_train.parallel.dispatcher import BYTE_COUNTERS

    total = torch.zeros(len(BYTE_COUNTERS), dtype=torch.long, device=platform.device())
    for dispatcher in dispatchers:
        total += dispatcher.counters
        dispatcher.reset_bytes()
    dist.all_reduce(total)
    return {name: int(v) for name, v in zip(BYTE_COUNTERS, total.tolist())}


def throughput(cfg, padded_vocab: int, tokens: int, seconds: float, world_size: int,
               also_max: torch.Tensor | None = None) -> dict:
    """tokens/s, model TFLOP/s per device and MFU, with the honest count of core/flops.py (attention,
    the k active experts, the router over its r*N candidates, and the LM head; x3 for training), and
    the peak memory of any rank (GPU: allocated; CPU: resident set size). ``also_max`` (float64) rides
    on the memory's all_reduce(MAX) and is replaced by its reduction (the straggler report's gather)."""
    from rexmoe_train.core.flops import flops_per_token, peak_tflops, shape_from_experiment

    per_token = flops_per_token(shape_from_experiment(cfg, padded_vocab), cfg.rexmoe.reuse_group_size,
                                cfg.train.seq_length)
    train_flops = 3 * (per_token["counted"] + per_token["lm_head"]) * tokens
    tflops = train_flops / seconds / world_size / 1e12
    precision = "fp8" if getattr(cfg.train, "fp8", None) else "bf16"
    peak = peak_tflops(platform.device_name(), precision, None)
    memory = torch.tensor([platform.max_memory_allocated_bytes()], dtype=torch.float64, device=platform.device())
    if also_max is not None:
        memory = torch.cat([memory, also_max.to(memory)])
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if also_max is not None:
        also_max.copy_(memory[1:])
        memory = memory[:1]
    return {"tokens_per_s": round(tokens / seconds, 1), "tflops_per_device": round(tflops, 4),
            "mfu": round(tflops / peak, 4) if peak else None,
            "memory_gib": round(float(memory) / 2**30, 3)}


def collapsed_groups(record: dict, share: float) -> list[int]:
    """Reuse groups where one physical expert took more than ``share`` of the group's assignments."""
    return [g for g, top in enumerate(record.get("group_max_share", [])) if top > share]
