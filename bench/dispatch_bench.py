"""Benchmark of the rexmoe_dedup dispatcher (not a test). Two parts, both run under torchrun:

bytes: the real DedupAllToAllDispatcher over an ep-rank gloo world, fed simulated routing (no model):
       forward bytes per token, dedup vs megatron's one-copy-per-expert alltoall, plus the analytic
       expectation for uniform routing.
         torchrun --standalone --nproc-per-node 8 bench/dispatch_bench.py bytes --out b.json
step:  fwd+bwd time per micro-batch of a small GPT at ep=2 (2 processes): r=4 vs r=1, our r=1 vs a
       stock megatron MoE GPTModel, rexmoe_dedup vs alltoall, the SequentialMLP loop bank vs the
       grouped bank (model.moe_grouped_gemm), all in one round-robin run.
         torchrun --standalone --nproc-per-node 2 bench/dispatch_bench.py step --out s.json

Byte formulas: rexmoe_train/parallel/dispatcher.py. Counted: forward, to other ranks only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torch.distributed as dist

from rexmoe_train import compat, platform

compat.install()

from rexmoe_train.config.schema import ExperimentConfig, ParallelConfig  # noqa: E402
from rexmoe_train.parallel.state import init_distributed, init_model_parallel  # noqa: E402


# --------------------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------------------
def simulate_routing(scenario: str, tokens: int, experts: int, topk: int, rank: int, seed: int):
    """[T, E] routing map + probs. Gumbel-top-k = k draws without replacement from softmax(logits).

    uniform:   every candidate equally likely.
    zipf:      candidate popularity ~ 1/i^1.1 over a shuffled order (same on all ranks): a few hot
               experts, as routers show without strong balancing.
    clustered: zipf popularity + 32 token clusters with their own candidate affinities (sd 1.5), so a
               token's k experts are correlated, as in trained routers.
    """
    shared = torch.Generator().manual_seed(seed)  # popularity/affinity: identical on every rank
    local = torch.Generator().manual_seed(seed + 1000 + rank)
    logits = torch.zeros(tokens, experts)
    if scenario in ("zipf", "clustered"):
        order = torch.randperm(experts, generator=shared)
        popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float).pow(1.1)
        logits += popularity[order].log()
    if scenario == "clustered":
        affinity = 1.5 * torch.randn(32, experts, generator=shared)
        logits += affinity[torch.randint(0, 32, (tokens,), generator=local)]
    gumbel = -torch.log(-torch.log(torch.rand(tokens, experts, generator=local).clamp_min(1e-20)))
    scores = logits + gumbel
    top = scores.topk(topk, dim=1)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top.indices, True)
    gates = torch.zeros(tokens, experts).scatter(1, top.indices, torch.softmax(top.values, dim=1))
    return routing_map, gates


def analytic_uniform(ep: int, experts: int, topk: int, hidden: int, elem: int, tokens: int) -> dict:
    """Expected forward bytes per token for uniform top-k (remote ranks only)."""
    local = experts // ep
    width = min(topk, local)
    p_hit = 1.0 - math.comb(experts - local, topk) / math.comb(experts, topk)  # a given rank is hit
    rows = (ep - 1) * p_hit
    copies = topk * (ep - 1) / ep
    return {
        "remote_rows_per_token": rows,
        "remote_copies_per_token": copies,
        "dedup_dispatch": rows * (hidden * elem + 8 * width) + 8 * (ep - 1) / tokens,
        "dedup_combine": rows * hidden * elem,
        "stock_dispatch": copies * (hidden * elem + 4) + 8 * experts * (ep - 1) / tokens,
        "stock_combine": copies * hidden * elem,
    }


def bench_bytes(args) -> dict:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.parallel.dispatcher import DedupAllToAllDispatcher
    from rexmoe_train.training.metrics import dispatch_bytes

    rank, world = dist.get_rank(), dist.get_world_size()
    ep, experts = world, args.candidates
    cfg = ExperimentConfig()
    cfg.model.num_moe_experts, cfg.model.moe_router_topk = experts, args.topk
    cfg.model.hidden_size, cfg.model.num_attention_heads = args.hidden, 8
    cfg.parallel = ParallelConfig(expert_model_parallel_size=ep)
    init_model_parallel(cfg.parallel, 0)
    tc = copy.copy(transformer_config(cfg))
    local = experts // ep
    dispatcher = DedupAllToAllDispatcher(local, list(range(rank * local, (rank + 1) * local)),
                                         config=tc, pg_collection=get_default_pg_collection())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    results = {}
    for scenario in ("uniform", "zipf", "clustered"):
        routing_map, probs = simulate_routing(scenario, args.tokens, experts, args.topk, rank, args.seed)
        hidden = torch.randn(args.tokens, 1, args.hidden).to(dtype)
        rows, meta = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
        rows, meta = dispatcher.token_dispatch(rows, meta)
        expert_in, _, expert_probs = dispatcher.dispatch_postprocess(rows, meta)
        expert_out = expert_in * expert_probs.unsqueeze(-1).to(dtype)  # identity experts, gated
        out = dispatcher.token_combine(dispatcher.combine_preprocess(expert_out))
        out = dispatcher.combine_postprocess(out)
        # the identity "experts" make out = sum of gates * hidden = hidden (gates sum to 1)
        err = float((out.float() - hidden.float()).abs().max())
        assert err < 0.1, f"dedup round trip is wrong: max error {err}"
        total = dispatch_bytes([dispatcher])  # world sums, resets the counters
        per_token = {k.removesuffix("_bytes"): v / (ep * args.tokens) for k, v in total.items()}
        per_token["dispatch_saving"] = 1 - per_token["dispatch"] / per_token["stock_dispatch"]
        per_token["combine_saving"] = 1 - per_token["combine"] / per_token["stock_combine"]
        results[scenario] = per_token
    results["analytic_uniform"] = analytic_uniform(ep, experts, args.topk, args.hidden, elem, args.tokens)
    a = results["analytic_uniform"]
    a["dispatch_saving"] = 1 - a["dedup_dispatch"] / a["stock_dispatch"]
    a["combine_saving"] = 1 - a["dedup_combine"] / a["stock_combine"]
    if rank == 0:
        print(f"forward bytes per token to other ranks: top-{args.topk} of {experts}, ep={ep}, "
              f"H={args.hidden} {args.dtype}, {args.tokens} tokens/rank")
        print(f"{'routing':<17}{'dedup disp':>11}{'stock disp':>11}{'saving':>8}"
              f"{'dedup comb':>11}{'stock comb':>11}{'saving':>8}")
        for name, r in results.items():
            d = (r.get("dispatch", r.get("dedup_dispatch")), r["stock_dispatch"], r["dispatch_saving"],
                 r.get("combine", r.get("dedup_combine")), r["stock_combine"], r["combine_saving"])
            print(f"{name:<17}{d[0]:>11.1f}{d[1]:>11.1f}{d[2]:>8.1%}{d[3]:>11.1f}{d[4]:>11.1f}{d[5]:>8.1%}")
    return {"ep": ep, "candidates": experts, "topk": args.topk, "hidden": args.hidden,
            "dtype": args.dtype, "tokens_per_rank": args.tokens, "bytes_per_token": results}


# --------------------------------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------------------------------
def _step_config(r: int, dispatcher: str, args, grouped: bool = False) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 8, 256, 4, 2
    m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size = 16, 4, args.ffn
    cfg.rexmoe.reuse_group_size = r
    cfg.rexmoe.psr.schedule = "none"  # steady state: every router sees all r*N candidates
    cfg.train.seq_length, cfg.train.micro_batch_size = 256, args.micro_batch
    cfg.parallel.expert_model_parallel_size = 2
    cfg.parallel.moe_token_dispatcher_type = dispatcher
    m.moe_grouped_gemm = grouped
    return cfg.validate(dist.get_world_size())


def _stock_megatron_model(cfg: ExperimentConfig, vocab: int):
    """megatron's own GPTModel + MoELayer (local spec), same TransformerConfig as ours."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rexmoe_train.model.gpt import padded_vocab_size, transformer_config

    tc = transformer_config(cfg)
    tc.moe_router_load_balancing_type = "aux_loss"
    tc.moe_aux_loss_coeff = cfg.rexmoe.balance.layer_aux_coeff
    spec = get_gpt_layer_local_spec(num_experts=cfg.model.num_moe_experts, moe_grouped_gemm=False,
                                    normalization=cfg.model.normalization)
    return GPTModel(config=tc, transformer_layer_spec=spec, vocab_size=padded_vocab_size(vocab, 64, 1),
                    max_sequence_length=cfg.train.seq_length, position_embedding_type="rope")


def _time_step(model, x, pos) -> float:
    """One fwd+bwd on this rank; the step is as slow as its slowest rank."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    dist.barrier()
    start = time.perf_counter()
    model(x, pos, None, labels=x).float().mean().backward()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    model.zero_grad(set_to_none=True)
    clear_aux_losses_tracker()
    return float(elapsed)


def _target_ratios(rows: list[dict]) -> dict:
    """The issue's targets by the median: r=4 / r=1 in our stack (same dispatcher and bank) and our
    r=1 / stock megatron (per bank, alltoall)."""
    by = {(row["r"], row["dispatcher"], row["bank"]): row["median_s"] for row in rows}
    stock = by[(1, "alltoall", "megatron SequentialMLP")]
    out = {}
    for (r, dispatcher, bank), t in by.items():
        if r == 4 and (1, dispatcher, bank) in by:
            out[f"r=4 / r=1, {dispatcher}, {bank}"] = t / by[(1, dispatcher, bank)]
        if r == 1 and dispatcher == "alltoall" and bank != "megatron SequentialMLP":
            out[f"ours r=1 ({bank}) / stock megatron"] = t / stock
    best_r1 = min(t for (r, _, bank), t in by.items() if r == 1 and bank != "megatron SequentialMLP")
    out["best r=4 / best r=1 (any dispatcher, bank)"] = min(
        t for (r, _, _), t in by.items() if r == 4) / best_r1
    return out


def bench_step(args) -> dict:
    """All cases are built up front and timed round-robin (one step each per round), so background
    load on a shared machine hits every case alike; the median over rounds is reported."""
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.parallel.dispatcher import find_dedup_dispatchers
    from rexmoe_train.training.metrics import dispatch_bytes

    vocab = 257
    # (name, r, dispatcher, stock, grouped bank)
    cases = [("megatron MoE (stock)", 1, "alltoall", True, False)]
    for r in (1, 4):
        for dispatcher in ("alltoall", "rexmoe_dedup"):
            for grouped in args.banks:
                cases.append((f"ours r={r}", r, dispatcher, False, grouped == "grouped"))
    compat.reset_megatron_global_state()
    init_model_parallel(_step_config(1, "alltoall", args).parallel, 1234)  # one layout for all
    models = []
    for _, r, dispatcher, stock, grouped in cases:
        cfg = _step_config(r, dispatcher, args, grouped)
        models.append(_stock_megatron_model(cfg, vocab) if stock else build_model(cfg, vocab).chunks[0])
    seq, mb = cfg.train.seq_length, cfg.train.micro_batch_size
    pos = torch.arange(seq).unsqueeze(0).expand(mb, -1)
    g = torch.Generator().manual_seed(dist.get_rank())
    times: list[list[float]] = [[] for _ in cases]
    for i in range(args.warmup + args.iters):
        x = torch.randint(0, vocab, (mb, seq), generator=g)  # the same batch for every case
        for c, model in enumerate(models):
            elapsed = _time_step(model, x, pos)
            if i >= args.warmup:
                times[c].append(elapsed)
    rows = []
    for (name, r, dispatcher, stock, grouped), model, case_times in zip(cases, models, times):
        median = statistics.median(case_times)
        bank = "megatron SequentialMLP" if stock else ("grouped" if grouped else "SequentialMLP")
        row = {"model": name, "r": r, "dispatcher": dispatcher, "bank": bank, "median_s": median,
               "min_s": min(case_times), "times_s": case_times,
               "tokens_per_s": mb * seq * dist.get_world_size() / median}
        dispatchers = [] if stock else find_dedup_dispatchers([model])
        if dispatcher == "rexmoe_dedup":
            total = dispatch_bytes(dispatchers)  # world sum over all steps run
            row.update({k: v / (args.warmup + args.iters) for k, v in total.items()})  # per step
        rows.append(row)
        if dist.get_rank() == 0:
            extra = ""
            if "dispatch_bytes" in row:
                extra = (f"  fwd a2a MB/step: dispatch {row['dispatch_bytes'] / 1e6:.2f} "
                         f"(stock {row['stock_dispatch_bytes'] / 1e6:.2f}), combine "
                         f"{row['combine_bytes'] / 1e6:.2f} (stock {row['stock_combine_bytes'] / 1e6:.2f})")
            print(f"{name:<22}{dispatcher:<14}{bank:<24}{median * 1e3:>9.1f} ms (min {min(case_times) * 1e3:.1f})"
                  f"{row['tokens_per_s']:>8.0f} tok/s" + extra, flush=True)
    ratios = _target_ratios(rows)
    if dist.get_rank() == 0:
        for name, value in ratios.items():
            print(f"{name:<58}{value:>7.3f}")
    return {"ratios_by_median": ratios,
            "config": {"layers": 8, "hidden": 256, "experts_per_layer": 16, "topk": 4, "seq": 256,
                       "micro_batch": mb, "moe_ffn_hidden": args.ffn, "ep": 2,
                       "world": dist.get_world_size(), "threads_per_rank": torch.get_num_threads(),
                       "device": platform.device_name(), "warmup": args.warmup, "iters": args.iters,
                       "measure": "fwd+bwd of one micro-batch, max over ranks, median over rounds"},
            "cases": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("bytes", "step"))
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--candidates", type=int, default=256, help="bytes: r*N physical experts")
    parser.add_argument("--topk", type=int, default=8, help="bytes: router top-k")
    parser.add_argument("--hidden", type=int, default=512, help="bytes: hidden size")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bytes: activations")
    parser.add_argument("--tokens", type=int, default=4096, help="bytes: tokens per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batch", type=int, default=4, help="step: sequences per micro-batch")
    parser.add_argument("--ffn", type=int, default=512, help="step: expert FFN hidden size")
    parser.add_argument("--banks", nargs="+", choices=("loop", "grouped"), default=["loop", "grouped"],
                        help="step: our expert banks to time (loop = SequentialMLP)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    init_distributed()
    result = bench_bytes(args) if args.part == "bytes" else bench_step(args)
    if args.out and dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
