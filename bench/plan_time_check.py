#!/usr/bin/env python3
"""The planner's step-time model (rexmoe_train/plan/timing.py) against a published MoE throughput.

    python bench/plan_time_check.py [--gpu h100-sxm] [--simulated] [--out r.json]   # Mixtral 8x7B vs mcore
    OMP_NUM_THREADS=1 python bench/plan_time_check.py --measure-cpu      # the cpu row of plan/hardware.py
    OMP_NUM_THREADS=1 python bench/plan_time_check.py --cpu-step [--simulated] [HYDRA_OVERRIDE ...]
        # real CPU steps against the estimate from their own op records (--simulated: and from the
        # planner's simulated step of the same config)

Published figure: megatron-core's MoE README (megatron/core/transformer/moe/README.md, as of MCore
v0.9-v0.15): "468 TFLOPS for Mixtral 8X7B bf16 training", with its reference layout (the README's
"Reference Best Parallel Mapping", MCore v0.8): 64 H100 80GB HBM3 (8 per node, NVLink 4, 8 x 400 Gb/s
InfiniBand), dropless, all-to-all dispatcher, bf16, seq 4096, TP 1, EP 8, PP 4, VP 8, MBS 1, GBS 256;
examples/mixtral/train_mixtral_8x7b_distributed.sh adds grouped GEMM, the distributed optimizer and
overlapped grad reduce / param gather, and no recompute. Megatron's TFLOP/s counts
num_floating_point_operations (megatron/training/training.py of the time: 12 x full, non-causal
attention, SwiGLU experts x top-k, the logits; no router).

The per-rank records here are ANALYTIC (the simulator is not run at 64 ranks for this check): each
pipeline rank's forward + backward of its 8 layers over 16 micro-batches, op by op, with balanced
routing. GEMM FLOPs are exact for the shapes; attention is one fused op whose FLOPs are counted over
the full s^2 square, as torch's flop counter counts them (the time model charges the causal half;
backward 2.5 x forward); element-wise ops move each listed tensor once in the forward and twice in
the backward (stated per op below). The estimate is predicted TFLOP/s per
GPU in megatron's count = megatron FLOPs per step / predicted step time / 64.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

PUBLISHED_TFLOPS = 468.0
MIXTRAL = dict(layers=32, hidden=4096, heads=32, groups=8, head_dim=128, ffn=14336, experts=8, topk=2,
               vocab=32000, seq=4096, micro_batch=1, global_batch=256, world=64, tp=1, ep=8, pp=4, vpp=8)


def megatron_flops_per_step(c: dict) -> float:
    """Megatron's num_floating_point_operations (late 2024) for the Mixtral shape, re-derived: per
    token 12 * L * h^2 * [(1 + g/heads + s/h) + (ffn/h) * topk * 3/2 + vocab / (2 L h)]."""
    h, L, s = c["hidden"], c["layers"], c["seq"]
    ratio = c["heads"] * c["head_dim"] / h
    per_token = 12 * L * h * h * ((1 + c["groups"] / c["heads"] + s / h) * ratio
                                  + c["ffn"] / h * c["topk"] * 1.5 + c["vocab"] / (2 * L * h))
    return per_token * c["global_batch"] * s


def _layer_ops(c: dict, OpRecord) -> list:
    """One MoE layer, one micro-batch, forward then backward, on one rank (tp 1, balanced routing)."""
    b, T, h = 2, c["micro_batch"] * c["seq"], c["hidden"]  # b: bytes per bf16 element
    qkv = (c["heads"] + 2 * c["groups"]) * c["head_dim"]
    q = c["heads"] * c["head_dim"]
    F, N, k, ep = c["ffn"], c["experts"], c["topk"], c["ep"]
    local = N // ep
    R = T * k  # expert rows this rank computes: balanced, it receives as many as it sends
    attn = 4 * c["micro_batch"] * c["seq"] ** 2 * q  # QK^T + PV, the full square as torch's counter has it

    def gemm(name, m, n, kk, weights):
        return OpRecord(name, 2 * m * n * kk, (m * kk + weights + m * n) * b, "torch.bfloat16")

    def mem(name, elems):
        return OpRecord(name, 0, elems * b, "torch.bfloat16")

    forward = [
        mem("rms_norm", 2 * T * h), gemm("mm", T, qkv, h, h * qkv),
        mem("rope", 4 * T * (q + c["groups"] * c["head_dim"])),
        OpRecord("_flash_attention_forward", attn, (T * qkv + T * q) * b, "torch.bfloat16"),
        gemm("mm", T, h, q, q * h), mem("add", 3 * T * h), mem("rms_norm", 2 * T * h),
        gemm("mm", T, N, h, h * N), mem("softmax_topk", 3 * T * N), mem("permute", 2 * R * h),
        gemm("_grouped_mm", R, 2 * F, h, local * h * 2 * F), mem("swiglu", 3 * R * F),
        gemm("_grouped_mm", R, h, F, local * F * h), mem("unpermute_combine", 2 * R * h + T * h),
        mem("add", 3 * T * h),
    ]
    backward = []
    for op in forward:
        if op.name in ("mm", "_grouped_mm"):  # dgrad + wgrad, each the forward's size
            backward += [op, op]
        elif op.name.startswith("_flash"):
            backward.append(OpRecord("_flash_attention_backward", int(2.5 * op.flops), 2 * op.bytes_moved,
                                     op.dtype))
        else:
            backward.append(OpRecord(op.name + "_backward", 0, 2 * op.bytes_moved, op.dtype))
    return forward + backward


def mixtral_traces(c: dict = MIXTRAL) -> list:
    """Analytic RankTraces of the four pipeline stages (every rank of a stage alike under balance)."""
    from rexmoe_train.plan.records import CollectiveRecord, OpRecord, RankTrace
    from rexmoe_train.plan.timing import wire_bytes

    T, h, V = c["micro_batch"] * c["seq"], c["hidden"], c["vocab"]
    pp, vpp, ep, world = c["pp"], c["vpp"], c["ep"], c["world"]
    dp = world // (c["tp"] * pp)
    edp = world // (ep * pp)
    m = c["global_batch"] // (c["micro_batch"] * dp)
    layers = c["layers"] // pp  # per rank, one per virtual chunk here
    attention = h * (c["heads"] + 2 * c["groups"]) * c["head_dim"] + c["heads"] * c["head_dim"] * h
    dense_per_layer = attention + 2 * h + h * c["experts"]  # + norms + router
    expert_per_layer = 3 * h * c["ffn"] * c["experts"] // ep
    a2a_buffer = T * c["topk"] * h * 2
    layer_ops = _layer_ops(c, OpRecord)
    traces = []
    for stage in range(pp):
        ops = layer_ops * (layers * m)
        dense = dense_per_layer * layers
        if stage == 0:  # embedding lookup forward, scatter-add of its gradient backward
            ops = ops + [OpRecord("embedding", 0, 2 * T * h * 2, "torch.bfloat16"),
                         OpRecord("embedding_backward", 0, 3 * T * h * 4, "torch.float32")] * m
            dense += V * h
        if stage == pp - 1:  # final norm, output layer, fp32 vocab cross-entropy (6 passes over T x V)
            head = OpRecord("mm", 2 * T * h * V, (T * h + h * V + T * V) * 2, "torch.bfloat16")
            ops = ops + [OpRecord("rms_norm", 0, 2 * T * h * 2, "torch.bfloat16"), head, head, head,
                         OpRecord("cross_entropy", 0, 6 * T * V * 4, "torch.float32")] * m
            dense += V * h + h
        experts = expert_per_layer * layers
        # distributed-optimizer step on this rank's shards: fp32 grad read, master/m/v read+write,
        # bf16 param write (30 B per shard param), grad-norm read (4 B) and zeroing the grad buffer
        shard = dense / dp + experts / edp
        ops = ops + [OpRecord("adam_step", 0, int(34 * shard), "torch.float32"),
                     OpRecord("zero_grad_buffer", 0, 4 * (dense + experts), "torch.float32")]
        colls = []
        per_a2a = wire_bytes("all_to_all", a2a_buffer, ep)
        colls += [CollectiveRecord("expert_all_to_all", "ep", ep, per_a2a, per_a2a)] * (4 * layers * m)
        p2p = wire_bytes("send_recv", T * h * 2, 2)
        sends = 2 * vpp - (stage == pp - 1) - (stage == 0)  # forward out + backward out per micro-batch
        colls += [CollectiveRecord("pp_send_recv", "pp", pp, p2p, p2p)] * (sends * m)
        for kind, buffer, group, n in (("dp_reduce_scatter", 4 * dense, "dp", dp),
                                       ("dp_all_gather", 2 * dense, "dp", dp),
                                       ("dp_reduce_scatter", 4 * experts, "edp", edp),
                                       ("dp_all_gather", 2 * experts, "edp", edp)):
            wire = wire_bytes(kind.split("_", 1)[1], int(buffer), n)
            colls.append(CollectiveRecord(kind, group, n, wire, wire))
        ranks = [r for r in range(world) if r // (world // pp) == stage]
        traces.append(RankTrace(ranks=ranks, ops=ops, collectives=colls))
    return traces


def mixtral_check(gpu_name: str, implied: bool = True) -> dict:
    from rexmoe_train.plan.hardware import get_gpu
    from rexmoe_train.plan.timing import Layout, estimate_step_time

    c = MIXTRAL
    dp = c["world"] // (c["tp"] * c["pp"])
    layout = Layout(world_size=c["world"], tp=c["tp"], pp=c["pp"], ep=c["ep"], vpp=c["vpp"],
                    num_micro_batches=c["global_batch"] // (c["micro_batch"] * dp), overlap_dp=True)
    flops = megatron_flops_per_step(c)
    est = estimate_step_time(mixtral_traces(c), layout, get_gpu(gpu_name), "bf16", model_flops=flops)
    predicted = flops / est["step_time_s"] / c["world"] / 1e12
    implied = implied_gemm_efficiency(c, layout, gpu_name, flops) if implied else float("nan")
    published_step = flops / (PUBLISHED_TFLOPS * 1e12 * c["world"])
    return {"case": "Mixtral 8x7B, 64 x H100, TP1 EP8 PP4 VP8, MBS1 GBS256, seq 4096, bf16",
            "gpu": gpu_name, "published_tflops_per_gpu": PUBLISHED_TFLOPS,
            "predicted_tflops_per_gpu": round(predicted, 1), "ratio_predicted_over_published":
            round(predicted / PUBLISHED_TFLOPS, 3), "published_step_time_s": round(published_step, 3),
            "predicted_step_time_s": round(est["step_time_s"], 3),
            "compute_s": round(est["compute_s"], 3), "comm_s": round(est["comm_s"], 3),
            "exposed_comm_s": round(est["exposed_comm_s"], 3), "bubble_s": round(est["bubble_s"], 3),
            "comm_by_link_s": {k: round(v, 3) for k, v in est["comm_by_link_s"].items()},
            "megatron_flops_per_step": flops, "implied_gemm_efficiency": round(implied, 3),
            "records": "analytic (bench/plan_time_check.py)"}


def mixtral_simulated_check(gpu_name: str) -> dict:
    """The same comparison from the planner's simulated step (plan/simulate.py, --spec te, balanced
    routing) of the Mixtral config at 64 ranks: ranks 0 (first stage), 16 (standing for the two middle
    stages, identical by construction) and 48 (last stage), each standing for its stage's 16 ranks."""
    from rexmoe_train.plan.hardware import get_gpu
    from rexmoe_train.plan.timing import Layout, estimate_step_time

    c = MIXTRAL
    traces = []
    for rank, stands_for in ((0, range(0, 16)), (16, range(16, 48)), (48, range(48, 64))):
        trace = simulated_trace(MIXTRAL_OVERRIDES, "te", c["world"], rank)
        trace.ranks = list(stands_for)
        traces.append(trace)
    layout = Layout(world_size=64, pp=4, ep=8, vpp=8, num_micro_batches=16, overlap_dp=True)
    flops = megatron_flops_per_step(c)
    est = estimate_step_time(traces, layout, get_gpu(gpu_name), "bf16", model_flops=flops)
    predicted = flops / est["step_time_s"] / c["world"] / 1e12
    return {"case": "Mixtral 8x7B as above, records from the planner's simulated step (spec te)",
            "predicted_tflops_per_gpu": round(predicted, 1),
            "ratio_predicted_over_published": round(predicted / PUBLISHED_TFLOPS, 3),
            "predicted_step_time_s": round(est["step_time_s"], 3), "compute_s": round(est["compute_s"], 3),
            "exposed_comm_s": round(est["exposed_comm_s"], 3), "bubble_s": round(est["bubble_s"], 3),
            "simulated_peak_gib": [round(t.peak_bytes / 2 ** 30, 2) for t in traces]}


def implied_gemm_efficiency(c: dict, layout, gpu_name: str, flops: float) -> float:
    """The GEMM efficiency (all else as stated) at which the estimate meets the published figure."""
    import dataclasses

    from rexmoe_train.plan.hardware import get_gpu
    from rexmoe_train.plan.timing import EFFICIENCY, estimate_step_time

    traces, gpu = mixtral_traces(c), get_gpu(gpu_name)
    target = flops / (PUBLISHED_TFLOPS * 1e12 * c["world"])
    low, high = 0.05, 1.0
    for _ in range(20):  # predicted step time falls as the efficiency rises
        mid = (low + high) / 2
        eff = dataclasses.replace(EFFICIENCY[gpu_name], gemm=mid)
        step = estimate_step_time(traces, layout, gpu, "bf16", model_flops=flops, efficiency=eff)["step_time_s"]
        low, high = (mid, high) if step > target else (low, mid)
    return (low + high) / 2


CPU_STEP_DEFAULTS = ["rexmoe.psr.schedule=none", "train.log_interval=1000000", "train.eval_interval=1000000",
                     "run.progress=false", "run.wandb.mode=disabled"]


# ops that launch no kernel touching memory: views without an alias annotation, bare allocations
_NO_TRAFFIC = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "lift_fresh", "set_", "resize_"}


def _is_view(func) -> bool:
    rets = func._schema.returns
    if func._overloadpacket.__name__ in _NO_TRAFFIC:
        return True
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


def record_ops(step) -> list:
    """OpRecords of every aten op ``step()`` runs on real tensors (autograd's backward included):
    FLOPs from torch's flop counter registry, bytes = every tensor input read + output written, views
    (no kernel) as nothing. The same records the simulator makes on fake tensors, made on real ones."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    from rexmoe_train.plan.records import OpRecord

    ops = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if _is_view(func):
                ops.append(OpRecord(str(func), 0, 0, ""))
                return out
            packet = func._overloadpacket
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() * t.element_size() for t in tensors)
            dtype = str(tensors[-1].dtype) if tensors else ""
            ops.append(OpRecord(str(func), flops, moved, dtype))
            return out

    with Recorder():
        step()
    return ops


def cpu_step_check(overrides: list[str], steps: int = 5, simulated: bool = False, rounds: int = 3) -> dict:
    """Time real training steps of a config on this CPU (one rank, one thread) and compare with the
    time model's cpu estimate from that step's own op records (and, with ``simulated``, from the
    planner's simulated step of the same config)."""
    import dataclasses
    import statistics

    import torch

    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.plan.hardware import get_gpu
    from rexmoe_train.plan.records import RankTrace
    from rexmoe_train.plan.timing import (
        EFFICIENCY,
        Layout,
        estimate_step_time,
        model_flops_per_step,
        op_class,
        op_time_s,
    )
    from rexmoe_train.training.trainer import Trainer

    torch.set_num_threads(1)
    # The machine is shared: its rates and the step time both swing with the others' load. Alternate
    # rate measurements and timed steps for ``rounds`` rounds and keep the best of each (the least
    # disturbed moments), so the rates the estimate uses and the step it is compared with match.
    rates: dict[str, float] = {}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(compose_experiment([*CPU_STEP_DEFAULTS, *overrides, f"run.dir={tmp}",
                                              f"train.train_iters={rounds * steps + 10}"]).experiment)
        cfg = trainer.cfg
        for _ in range(2):  # warm-up: allocator, first-call paths
            trainer.train_step()
        for _ in range(rounds):
            for key, value in measure_cpu().items():
                better = min if key.endswith("_s") else max
                rates[key] = better(rates.get(key, value), value)
            for _ in range(steps):
                began = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - began)
        ops = record_ops(trainer.train_step)
        trainer.logger.close()
    cpu_now = dataclasses.replace(
        get_gpu("cpu"), peak_fp32_flops=max(v for k, v in rates.items() if k.startswith("gemm")),
        hbm_bytes_per_s=rates["copy_bytes_per_s"])
    cpu_now = dataclasses.replace(cpu_now, peak_bf16_flops=cpu_now.peak_fp32_flops)
    layout = Layout.from_experiment(cfg, 1)
    flops = model_flops_per_step(cfg, cfg.padded_vocab_size(trainer.vocab_size))
    trace = [RankTrace(ranks=[0], ops=ops)]
    est = estimate_step_time(trace, layout, get_gpu("cpu"), "fp32", model_flops=flops)
    est_now = estimate_step_time(trace, layout, cpu_now, "fp32", model_flops=flops)
    fastest = min(times)
    split = {"gemm": 0.0, "attention": 0.0, "memory": 0.0}  # the estimate by op class (now-rates)
    for op in ops:
        split[op_class(op.name)] += op_time_s(op, cpu_now, "fp32", EFFICIENCY["cpu"])
    kernels = sum(1 for op in ops if op.flops or op.bytes_moved)
    extra = {}
    if simulated:
        try:
            sim = [simulated_trace(overrides)]
            for name, spec_row in (("table", get_gpu("cpu")), ("now", cpu_now)):
                t = estimate_step_time(sim, layout, spec_row, "fp32", model_flops=flops)["step_time_s"]
                extra[f"simulated_predicted_step_s_{name}"] = round(t, 4)
                extra[f"simulated_ratio_{name}"] = round(t / fastest, 3)
            extra["simulated_ops"] = sum(1 for op in sim[0].ops if op.flops or op.bytes_moved)
            extra["simulated_flops"] = sum(op.flops for op in sim[0].ops)
        except RuntimeError as err:
            extra["simulated"] = f"simulator failed: {err}"
    return {**extra, "case": "one real training step on this CPU, 1 thread, fp32, world size 1",
            "overrides": [*CPU_STEP_DEFAULTS, *overrides], "measured_step_s_min": round(fastest, 4),
            "measured_step_s_median": round(statistics.median(times), 4),
            "predicted_step_s": round(est["step_time_s"], 4),
            "ratio_predicted_over_measured": round(est["step_time_s"] / fastest, 3),
            "predicted_step_s_rates_measured_now": round(est_now["step_time_s"], 4),
            "ratio_with_rates_measured_now": round(est_now["step_time_s"] / fastest, 3),
            "cpu_rates_now": {k: float(f"{v:.3g}") for k, v in rates.items()},
            "predicted_by_op_class_s_now": {k: round(v, 4) for k, v in split.items()},
            "ops": kernels, "traced_flops": sum(op.flops for op in ops),
            "traced_bytes": sum(op.bytes_moved for op in ops),
            "per_op_overhead_share": round(kernels * est["assumptions"]["efficiency"]["kernel_overhead_s"]
                                           / est["step_time_s"], 3),
            "records": "real-tensor op records of the same step (bench/plan_time_check.py record_ops)"}


MIXTRAL_OVERRIDES = [
    "model.num_layers=32", "model.hidden_size=4096", "model.num_attention_heads=32", "model.num_query_groups=8",
    "model.num_moe_experts=8", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=14336",
    "model.vocab_size=32000", "model.make_vocab_size_divisible_by=128", "rexmoe.reuse_group_size=1",
    "parallel.expert_model_parallel_size=8", "parallel.pipeline_model_parallel_size=4",
    "parallel.virtual_pipeline_model_parallel_size=8", "parallel.use_distributed_optimizer=true",
    "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=256", "train.bf16=true"]


def simulate_worker(spec: str, overrides: list[str], world_size: int = 1, rank: int = 0) -> dict:
    """The planner's simulated step (plan/simulate.py, fake tensors) of the same config, as a dict."""
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.plan.records import to_dict
    from rexmoe_train.plan.simulate import SimSettings, simulate_rank

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_experiment([*CPU_STEP_DEFAULTS, *overrides, f"run.dir={tmp}"]).experiment
        trace = simulate_rank(cfg, world_size, rank, SimSettings(spec=spec))
    out = to_dict(trace)
    out.pop("meta", None)
    return out


def simulated_trace(overrides: list[str], spec: str = "local", world_size: int = 1, rank: int = 0):
    """``simulate_worker`` in a process of its own (it owns the process group while it runs)."""
    from rexmoe_train.plan.records import CollectiveRecord, OpRecord, RankTrace

    proc = subprocess.run([sys.executable, __file__, "--simulate-worker", spec, "--world", str(world_size),
                           "--rank", str(rank), *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return RankTrace(ranks=data["ranks"], ops=[OpRecord(**o) for o in data["ops"]],
                     collectives=[CollectiveRecord(**c) for c in data["collectives"]],
                     peak_bytes=data["peak_bytes"], by_category=data["by_category"])


def measure_cpu() -> dict:
    """The cpu row's figures: best-of-5 single-thread fp32 matmuls and a 256 MiB copy."""
    import torch

    torch.set_num_threads(1)

    def best(f, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    out = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out[f"gemm_{n}_flops_per_s"] = 2 * n ** 3 / best(lambda: a @ b)
    x = torch.randn(64 * 1024 * 1024)
    y = torch.empty_like(x)
    out["copy_bytes_per_s"] = 2 * x.numel() * 4 / best(lambda: y.copy_(x))
    z = torch.randn(16)
    out["bare_op_s"] = best(lambda: [z.add(1) for _ in range(1000)]) / 1000
    # eager training cost per op: forward + backward of 50 tiny Linear+SiLU layers (autograd and
    # nn.Module calls included), over the ops it runs
    net = torch.nn.Sequential(*[m for _ in range(50) for m in (torch.nn.Linear(16, 16), torch.nn.SiLU())])
    x = torch.randn(4, 16)

    def step():
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    step()
    kernels = sum(1 for op in record_ops(step) if op.flops or op.bytes_moved)
    out["eager_training_op_s"] = best(step, 20) / kernels
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--measure-cpu", action="store_true")
    ap.add_argument("--cpu-step", action="store_true", help="time real CPU steps against the estimate")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--simulated", action="store_true",
                    help="also estimate from the planner's simulated records (Mixtral: ~5 min per rank)")
    ap.add_argument("--simulate-worker", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args, overrides = ap.parse_known_args(argv)
    if args.simulate_worker:
        print(json.dumps(simulate_worker(args.simulate_worker, overrides, args.world, args.rank)))
        return 0
    if args.cpu_step:
        result = cpu_step_check(overrides, args.steps, args.simulated)
    elif args.measure_cpu:
        result = measure_cpu()
    else:
        result = mixtral_check(args.gpu)
        if args.simulated:
            result["simulated"] = mixtral_simulated_check(args.gpu)
    for key, value in result.items():
        print(f"{key:34s} {value}")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
