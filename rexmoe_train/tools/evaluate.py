"""`rexmoe-eval`: validation loss, perplexity and router statistics of a checkpoint, as JSON.

  rexmoe-eval CKPT [--data-source embedded|indexed] [--blend W1 P1 W2 P2 ... | P ...] [--tokenizer T]
              [--batches N] [--micro-batch-size M] [--psr-step checkpoint|full] [--out FILE.json]

CKPT is a training checkpoint directory or one iter_* directory, saved in any parallel layout; it is
loaded into this one process (fp32). By default the data are the checkpoint's own data config and the
batches are the ones the trainer's evaluation reads (the first train.eval_iters x data-parallel size
validation micro-batches of train.micro_batch_size windows, unshuffled), so ``val_loss`` is the
``val_loss`` the run logged at that step. ``--psr-step checkpoint`` (default) routes with the PSR mask
of the checkpoint's step, what the model was trained to use; ``full`` opens all r*N candidates, what
an exported model computes. Router statistics use the definitions of the training metrics
(training/metrics.py): per-layer MaxVio over the available candidates and the under-used fraction, and
per reuse group the pooled MaxVio, the reuse matrix and the raw per-candidate loads. A bad input exits
with status 2 and one line saying why.
"""

from __future__ import annotations

import math
from pathlib import Path

PROG = "rexmoe-eval"


class EvalError(Exception):
    """A bad input: reported as one line, exit status 2."""


def _blend(values: list[str]) -> list:
    """``--blend 0.7 data/a 0.3 data/b`` -> [0.7, "data/a", 0.3, "data/b"] (numbers become weights)."""
    out: list = []
    for value in values:
        try:
            out.append(float(value))
        except ValueError:
            out.append(value)
    return out


def _data_config(cfg, args):
    import dataclasses

    data = cfg.data
    if args.data_source:
        data = dataclasses.replace(data, source=args.data_source)
    if args.blend:
        data = dataclasses.replace(data, blend=_blend(args.blend))
    if args.tokenizer:
        data = dataclasses.replace(data, tokenizer=args.tokenizer)
    data.validate()  # ConfigError: one line
    return data


def _load_counter(model):
    """Forward hooks summing each router's routing map (physical order) -> candidate-order loads."""
    import torch

    routers = model.routers
    loads = {id(r): torch.zeros(r.group.num_candidates, dtype=torch.float64) for r in routers}

    def hook(router, _inputs, output):
        routing_map = output[1]
        counts = routing_map.sum(dim=0).to(device="cpu", dtype=torch.float64)
        if not router.placement.is_identity:  # physical column p holds candidate candidate_of_physical[p]
            counts = torch.zeros_like(counts).index_copy_(0, router.placement.candidate_of_physical, counts)
        loads[id(router)] += counts

    handles = [r.register_forward_hook(hook) for r in routers]
    return routers, loads, handles


def evaluate(args) -> dict:
    import torch

    from rexmoe_train import platform
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.data.loader import valid_batches
    from rexmoe_train.data.sources import build_datasets
    from rexmoe_train.training.metrics import router_load

    iter_dir = checkpoint_io.resolve(Path(args.checkpoint))
    saved_cfg, meta = checkpoint_io.read_checkpoint_config(iter_dir)
    data_cfg = _data_config(saved_cfg, args)  # bad data options fail before the model loads
    t = saved_cfg.train
    saved_dp = int(meta.get("parallel", {}).get("data_parallel_size", 1))
    micro_batch_size = args.micro_batch_size or t.micro_batch_size
    # the trainer's dp ranks together read the first eval_iters * dp micro-batches (interleaved)
    num_batches = args.batches or t.eval_iters * saved_dp
    valid_samples = max(num_batches * micro_batch_size, t.eval_iters * t.micro_batch_size * saved_dp)
    _, valid, info = build_datasets(data_cfg, t.seq_length, t.seed,
                                    train_samples=t.train_iters * t.global_batch_size,
                                    valid_samples=valid_samples)
    vocab = int(meta["model"]["model.vocab_size"])
    if int(info["vocab_size"]) != vocab:
        raise EvalError(f"the data's tokenizer has {info['vocab_size']} tokens, the checkpoint's model "
                        f"{vocab}: evaluate with the tokenizer the model was trained with")

    cfg, model, meta = checkpoint_io.load_model(iter_dir)
    step = int(meta["step"])
    psr_step = step if args.psr_step == "checkpoint" else cfg.rexmoe.psr.end_step + 1  # > t_e: all r*N
    model.psr_state.set_step(psr_step)
    chunk = model.chunks[0].eval()
    routers, loads, handles = _load_counter(model)
    dev = platform.device()
    loss_sum, tokens, routed = 0.0, 0, 0
    batches = valid_batches(valid, micro_batch_size=micro_batch_size, num_batches=num_batches,
                            dp_rank=0, dp_size=1)
    try:
        with torch.no_grad():
            for batch in batches:
                losses = chunk(batch["tokens"].to(dev), batch["position_ids"].to(dev), None,
                               labels=batch["labels"].to(dev))
                mask = batch["loss_mask"].to(dev).float()
                loss_sum += float((losses.float() * mask).sum(dtype=torch.float64))
                tokens += int(mask.sum())
                routed += batch["tokens"].numel()
    finally:
        for handle in handles:
            handle.remove()

    # the training metrics read each router's step load: fill it with what this evaluation routed
    for router in routers:
        router.step_load.copy_(loads[id(router)].to(router.step_load.device))
    stats = router_load(cfg, routers, psr_step)
    stats.pop("expert_load", None)

    plan = cfg.reuse_plan()
    by_layer = {r.moe_layer: loads[id(r)] for r in routers}
    stats["expert_load"] = [[by_layer[layer].long().tolist() for layer in group.moe_layers]
                            for group in plan.groups]
    stats["routed_tokens"] = routed
    stats["topk"] = cfg.model.moe_router_topk

    val_loss = loss_sum / tokens if tokens else float("nan")
    try:
        perplexity = math.exp(val_loss)
    except OverflowError:
        perplexity = float("inf")
    return {
        "checkpoint": str(iter_dir.resolve()),
        "step": step,
        "psr": {"mode": args.psr_step, "step": psr_step, "candidates": stats["psr_candidates"]},
        "data": info,
        "micro_batch_size": micro_batch_size,
        "batches": num_batches,
        "tokens": tokens,
        "val_loss": val_loss,
        "perplexity": perplexity,
        "router": stats,
    }


def summary(result: dict) -> str:
    r = result["router"]
    fmt = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    return "\n".join([
        f"{result['checkpoint']} (step {result['step']}): val loss {result['val_loss']:.5f}, "
        f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
        f"({result['batches']} batches x {result['micro_batch_size']} windows)",
        f"  PSR {result['psr']['mode']} (step {result['psr']['step']}): {r['psr_candidates']} candidates; "
        f"MaxVio per layer {fmt(r['load_violation_max'])}, per group {fmt(r['group_load_violation_max'])}; "
        f"under-used {fmt(r['under_used_fraction'])}",
    ])


def positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise EvalError(f"{name} must be >= 1, got {value}")
