#!/usr/bin/env python3
"""The planner's peak memory against the same config run for real on CPU tensors.

    OMP_NUM_THREADS=1 python bench/plan_validate.py [--out r.json] [--only NAME ...]

For each config (model=tiny, one rank, fp32; activations dominate: hundreds of MiB), two fresh
processes:

  predicted  rexmoe-plan's simulated step (fake tensors, MemTracker): its peak bytes (--gpu cpu,
             balanced load, no imbalanced case)
  measured   rexmoe_train/plan/measure.py: the same model, DDP and optimizer built by the project's
             code, two real steps on random tokens; the peak resident-set growth over the process's
             resident set just before the model was built (the kernel's VmHWM, reset there; glibc
             maps every block over 64 KiB separately, so freed tensors leave the resident set)

Prints a table and JSON: predicted / measured, which should lie within 15 %. Speed and memory
figures belong here and in docs/benchmarks.md, never in a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (layer spec, overrides): different sequence, micro-batch and recompute
CONFIGS = {
    "local_s1024_mb4": ("local", ["train.seq_length=1024", "train.micro_batch_size=4",
                                  "train.global_batch_size=8"]),
    "local_s512_mb16_full_recompute": ("local", [
        "train.seq_length=512", "train.micro_batch_size=16", "train.global_batch_size=32",
        "model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]),
    "te_s2048_mb2": ("te", ["train.seq_length=2048", "train.micro_batch_size=2", "train.global_batch_size=4"]),
}
MIB = 1024 ** 2


def validate(name: str, spec: str, overrides: list[str]) -> dict:
    from rexmoe_train.plan.measure import measure_in_subprocess
    from rexmoe_train.plan.planner import PlanOptions
    from rexmoe_train.plan.search import make_plan

    started = time.perf_counter()
    plan = make_plan(overrides, PlanOptions(world_size=1, gpu="cpu", spec=spec, hot_factor=1.0, suggest=False))
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    real = measure_in_subprocess(overrides, fused_attention=spec == "te")
    real_s = time.perf_counter() - started
    predicted, measured = plan["peak_bytes"], real["peak_growth_bytes"]
    return {"name": name, "spec": spec, "overrides": overrides, "predicted_bytes": predicted,
            "measured_bytes": measured, "ratio": round(predicted / measured, 4),
            "by_category": plan["per_rank"][0]["by_category"], "plan_wall_s": round(plan_s, 1),
            "measure_wall_s": round(real_s, 1), "real_losses": real["losses"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="run these configs only")
    args = p.parse_args(argv)
    from rexmoe_train import compat

    compat.install()
    rows = [validate(name, *CONFIGS[name]) for name in (args.only or CONFIGS)]
    print(f"{'config':<34}{'spec':<7}{'predicted MiB':>14}{'measured MiB':>14}{'ratio':>8}")
    for r in rows:
        print(f"{r['name']:<34}{r['spec']:<7}{r['predicted_bytes'] / MIB:>14.1f}"
              f"{r['measured_bytes'] / MIB:>14.1f}{r['ratio']:>8.3f}")
    result = {"configs": rows, "max_deviation": max(abs(r["ratio"] - 1) for r in rows)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
