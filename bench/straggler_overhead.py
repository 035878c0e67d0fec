"""What the straggler report costs a training step (issue 23: under 1 %).

Two trainer processes (gloo, the tiny model with ep=2, the same code path as tests/resilience) run
``--steps`` training steps (``Trainer.train_step``, after one warm-up step) with the report on and
``train.log_interval=1`` (a gather every step: the worst case). Measured in those processes: the median
step time, the blocking collectives per step (counted by the clock), the cost of the timing wrapper per
call (the wrapper around a no-op, minus the no-op: the collective itself is unchanged by it), and one
gather's host work (the busy vector rides on metrics.throughput's all_reduce: no collective of its
own). Overhead = (collectives per step x wrapper cost + gather) / step time.

  OMP_NUM_THREADS=1 python bench/straggler_overhead.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch.multiprocessing as mp

TINY = ["model.hidden_size=64", "model.moe_ffn_hidden_size=64", "train.seq_length=32",
        "train.micro_batch_size=1", "train.global_batch_size=2", "train.lr_warmup_iters=1",
        "train.eval_iters=1", "train.eval_interval=1000", "run.progress=false", "run.wandb.mode=disabled",
        "parallel.expert_model_parallel_size=2", "train.log_interval=1", "checkpoint.save_interval=0"]


def _timed_calls(fn, calls: int) -> float:
    import torch

    t = torch.ones(1)
    start = time.perf_counter()
    for _ in range(calls):
        fn(t)
    return (time.perf_counter() - start) / calls


def _worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.resilience.straggler import CollectiveClock
    from rexmoe_train.training.trainer import Trainer

    overrides = [*TINY, f"train.train_iters={args.steps}", f"run.dir={args.run_dir}"]
    cfg = compose_experiment(overrides).experiment.validate(world)
    trainer = Trainer(cfg)
    trainer._set_mode(True)
    trainer.train_step()  # warm-up
    calls_before = CollectiveClock.calls
    steps = [trainer.train_step() for _ in range(args.steps)]
    calls = CollectiveClock.calls - calls_before

    def noop(*_args, **_kwargs):
        return None

    raw, wrapped = noop, CollectiveClock._timed(noop)
    samples_wrapped, samples_raw = [], []
    for _ in range(5):  # interleaved blocks
        samples_raw.append(_timed_calls(raw, args.calls * 50))
        samples_wrapped.append(_timed_calls(wrapped, args.calls * 50))
    CollectiveClock.calls, CollectiveClock.waited = 0, 0.0  # the no-op calls above are not collectives
    # the gather rides on the memory all_reduce (metrics.throughput): no collective of its own, world_size
    # x 8 bytes more in one that runs anyway. Its cost is the host work around it: the busy vector, the
    # concatenation and the judgement (timing the all_reduce itself with and without would measure noise)
    import torch

    memory = torch.zeros(1, dtype=torch.float64)
    start = time.perf_counter()
    for _ in range(args.calls):
        busy = trainer.straggler.local_vector()
        torch.cat([memory, busy])
        trainer.straggler.judge(busy.tolist())
    gather_s = (time.perf_counter() - start) / args.calls
    if rank == 0:
        out.put({
            "world_size": world, "steps": len(steps),
            "step_time_s_median": statistics.median(h["step_time_s"] for h in steps),
            "collectives_per_step": calls / len(steps),
            "wrapper_s_per_call": max(statistics.median(samples_wrapped) - statistics.median(samples_raw), 0.0),
            "gather_s": gather_s,
        })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--run-dir", default="/tmp/straggler_bench")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    result = out.get(timeout=1200)
    for proc in procs:
        proc.join()
    per_step = result["collectives_per_step"] * result["wrapper_s_per_call"] + result["gather_s"]
    result["overhead_s_per_step"] = per_step
    result["overhead_fraction"] = per_step / result["step_time_s_median"]
    print(json.dumps(result))
    print("| step time (median) | collectives / step | wrapper / call | gather | overhead / step |")
    print("|---|---|---|---|---|")
    print(f"| {result['step_time_s_median'] * 1e3:.1f} ms | {result['collectives_per_step']:.0f} | "
          f"{result['wrapper_s_per_call'] * 1e6:.2f} us | {result['gather_s'] * 1e6:.0f} us | "
          f"{per_step * 1e6:.0f} us = {100 * result['overhead_fraction']:.2f} % |")


if __name__ == "__main__":
    main()
