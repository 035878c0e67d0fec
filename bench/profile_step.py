#!/usr/bin/env python3
"""Where one training step's time goes: torch.profiler over the trainer's real steps, r=4 vs r=1.

    OMP_NUM_THREADS=1 python bench/profile_step.py [--reuse 4 1] [--steps 6] [--top 15] [--out prof.json]
                                                   [HYDRA_OVERRIDE ...]

For each r: builds the trainer on the embedded default (1 process, PSR off so every router sees r*N
candidates), runs 2 warm-up steps, then profiles --steps steps and prints the top operators by self
CPU time, plus the share of the step spent in per-step metrics (the logging reductions of
training/metrics.py), measured as the step time with log_interval=1 minus with logging off.
Prints JSON (--out) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time


def _trainer(reuse: int, log_interval: int, extra: list[str], run_dir: str):
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.training.trainer import Trainer

    overrides = [f"rexmoe.reuse_group_size={reuse}", "rexmoe.psr.schedule=none", "train.train_iters=1000",
                 f"train.log_interval={log_interval}", "train.eval_interval=1000", "run.progress=false",
                 "run.wandb.mode=disabled", f"run.dir={run_dir}", *extra]
    return Trainer(compose_experiment(overrides).experiment)


def _step_times(trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - began)
    return times


def profile(reuse: int, steps: int, top: int, extra: list[str]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rexmoe_train import compat

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(reuse, 1, extra, f"{tmp}/log")
        _step_times(trainer, 2)
        logged = _step_times(trainer, steps)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            _step_times(trainer, steps)
        trainer.logger.close()
        compat.reset_megatron_global_state()
        quiet = _trainer(reuse, 10**6, extra, f"{tmp}/quiet")  # log_interval past the run: no metrics work
        _step_times(quiet, 2)
        unlogged = _step_times(quiet, steps)
        quiet.logger.close()
        compat.reset_megatron_global_state()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    del torch
    return {
        "reuse": reuse,
        "step_s_median_logged": statistics.median(logged),
        "step_s_median_unlogged": statistics.median(unlogged),
        "metrics_share": 1 - statistics.median(unlogged) / statistics.median(logged),
        "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
                 "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in ranked],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", type=int, nargs="+", default=[4, 1])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args(argv)
    from rexmoe_train import compat

    compat.install()  # before any megatron-facing import
    from rexmoe_train.parallel.state import init_distributed

    init_distributed()
    results = [profile(r, args.steps, args.top, extra) for r in args.reuse]
    for res in results:
        print(f"\nr={res['reuse']}: step {res['step_s_median_logged'] * 1e3:.1f} ms with per-step metrics, "
              f"{res['step_s_median_unlogged'] * 1e3:.1f} ms without ({res['metrics_share']:.1%} of the step)")
        print("| op | self CPU ms/step | share | calls/step |\n|---|---|---|---|")
        for row in res["top"]:
            print(f"| `{row['op']}` | {row['self_cpu_ms']:.1f} | {row['share']:.1%} | {row['calls_per_step']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps([{k: v for k, v in r.items() if k != "top"} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
