#!/usr/bin/env python3
"""Activation recompute, measured against the dry run's prediction: peak memory down, step time up.

    OMP_NUM_THREADS=1 python bench/recompute_bench.py [--steps 10] [--repeats 2] [--out r.json] \
        [HYDRA_OVERRIDE ...]

Each setting below trains the same model (the embedded default unless overridden; PSR off so every
step does the same work) in a process of its own, --steps steps after 2 warm-up steps; the settings
run in turn, --repeats rounds, so background load hits each alike. Per process:

  step time   median wall time of trainer.train_step()
  peak memory the process's peak resident set (ru_maxrss) minus its resident set just before the first
              step: activations, gradients and the optimizer state created at the first step; only
              the activations differ between settings, so the difference to `off` is what recompute
              saves

and the dry run's numbers for the same config (rexmoe_train/tools/dry_run.py): ``activations_gib``
(peak activations, incl. one replayed chunk) and ``recompute_extra_compute`` (share of FLOPs
added). Prints a table and JSON: measured vs predicted saving and slow-down per setting. Use a
micro-batch large enough that activations dominate the noise of the resident set (the default
below: 16 x 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "off": [],
    "full uniform 1": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                       "model.recompute_num_layers=1"],
    "selective moe": ["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
}
DEFAULTS = ["train.micro_batch_size=16", "train.seq_length=512", "train.global_batch_size=16",
            "rexmoe.psr.schedule=none"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(setting: str, steps: int, extra: list[str]) -> dict:
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.tools.dry_run import activation_bytes
    from rexmoe_train.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*DEFAULTS, *extra, *SETTINGS[setting], f"train.train_iters={steps + 2}",
                     "train.log_interval=1000000", "train.eval_interval=1000000", "run.progress=false",
                     "run.wandb.mode=disabled", f"run.dir={tmp}"]
        trainer = Trainer(compose_experiment(overrides).experiment)
        cfg = trainer.cfg
        before = _rss_bytes()
        times = []
        for i in range(steps + 2):
            began = time.perf_counter()
            trainer.train_step()
            if i >= 2:
                times.append(time.perf_counter() - began)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        predicted = activation_bytes(cfg, bool(cfg.train.bf16), trainer.vocab_size)
        trainer.logger.close()
    return {"setting": setting, "step_s": statistics.median(times),
            "peak_over_start_gib": (peak - before) / 2**30,
            "predicted_activations_gib": predicted["activations_gib"],
            "predicted_extra_compute": predicted["recompute_extra_compute"]}


def summarise(runs: list[dict]) -> list[dict]:
    by = {}
    for run in runs:
        by.setdefault(run["setting"], []).append(run)
    off = by["off"]
    off_step = statistics.median(r["step_s"] for r in off)
    off_peak = statistics.median(r["peak_over_start_gib"] for r in off)
    rows = []
    for setting, rs in by.items():
        step = statistics.median(r["step_s"] for r in rs)
        peak = statistics.median(r["peak_over_start_gib"] for r in rs)
        rows.append({
            "setting": setting, "step_s": step, "peak_over_start_gib": peak,
            "measured_slowdown": step / off_step - 1,
            "predicted_extra_compute": rs[0]["predicted_extra_compute"],
            "measured_saving_gib": off_peak - peak,
            "predicted_saving_gib": off[0]["predicted_activations_gib"] - rs[0]["predicted_activations_gib"],
            "runs": rs})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, extra)))
        return 0
    runs = []
    for _ in range(args.repeats):
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps), *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[recompute] {setting}: {runs[-1]['step_s']:.3f} s/step, "
                  f"peak +{runs[-1]['peak_over_start_gib']:.3f} GiB", flush=True)
    rows = summarise(runs)
    print("| setting | s/step | slow-down measured / predicted (FLOPs) | peak over start GiB | "
          "saving GiB measured / predicted |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['step_s']:.3f} | {r['measured_slowdown']:+.1%} / "
              f"+{r['predicted_extra_compute']:.1%} | {r['peak_over_start_gib']:.3f} | "
              f"{r['measured_saving_gib']:.3f} / {r['predicted_saving_gib']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"overrides": [*DEFAULTS, *extra], "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
