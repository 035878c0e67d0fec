#!/usr/bin/env python3
"""Where does reuse beat vanilla? A seeded grid of reuse, gating and balancing variants on the tiny model.

    python recipes/ablation_tiny/run.py [--out runs/ablation_tiny] [--steps 250] [--seeds 42 43 44]
                                        [--only NAME ...] [--jobs N] [--report-only] [HYDRA_OVERRIDE ...]

Every variant trains the tiny default model (4 MoE layers, 8 experts each, top-2) for --steps steps
once per seed; only the reuse / gating / balancing settings differ, and within a seed every variant
sees the same tokens in the same order. The validation set depends on the data and split alone (not
on the seed), so all runs are scored on the same held-out windows; `train.eval_iters` is raised to
16 micro-batches so that the held-out sample's own noise is small next to the differences measured.

Writes to --out: results.json (every run's final val loss, MaxVio and under-used share, the val-loss
curve) and results.md (per variant: mean and spread (min..max, sample std) over seeds, and the
per-seed difference to vanilla with the same gating). Nothing is tuned per variant; tune only on the
embedded corpus, and check any conclusion on text the project never saw (`data.*` overrides).
A run whose metrics already reach --steps is not trained again. --jobs runs that many trainings at
once, one thread each (on a machine with C cores, --jobs C uses them all; one 2-thread run uses
two cores less well than two 1-thread runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
REPO = RECIPE.parents[1]
sys.path.insert(0, str(RECIPE.parent))  # recipes/_args.py, shared by the recipe scripts
from _args import check_overrides_and_only, split_overrides  # noqa: E402

NO_PSR = ["rexmoe.psr.schedule=none"]
PAPER_LITERAL = ("rexmoe.gating=softmax_then_topk", "rexmoe.gate_normalization=none", "rexmoe.psr.schedule=linear",
                 "rexmoe.psr.protect_local=false", "rexmoe.psr.mask_draw=per_step", "rexmoe.psr.mask_on=scores")
NO_AUX = ["rexmoe.balance.layer_aux_coeff=0.0"]
BIAS = ["rexmoe.balance.moe_router_enable_expert_bias=true"]


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple = field(default_factory=tuple)
    baseline: str = "r1"  # the vanilla run with the same gating
    ramp: tuple = (0.2, 0.6)  # PSR start / end step as fractions of --steps (when the variant has PSR)

    @property
    def reuse(self) -> int:
        return next(int(o.split("=")[1]) for o in self.overrides if o.startswith("rexmoe.reuse_group_size="))


def _v(name, label, *overrides, baseline="r1", ramp=(0.2, 0.6)):
    # the reuse factor is always explicit: a model config passed as an override (e.g. paper_small's,
    # which says r=1) must not silently turn an r=4 variant into vanilla
    if not any(o.startswith("rexmoe.reuse_group_size=") for o in overrides):
        overrides = ("rexmoe.reuse_group_size=4", *overrides)
    # ... nor may the packaged default's gate or PSR masking: a variant says what it changes from the
    # paper-literal setting (rexmoe=paper), so its meaning does not move with the default
    keys = {o.split("=")[0] for o in overrides}
    overrides = (*(o for o in PAPER_LITERAL if o.split("=")[0] not in keys), *overrides)
    return Variant(name, label, tuple(overrides), baseline, ramp)


T2S = "rexmoe.gating=topk_then_softmax"
# The gate x PSR cross (docs/ablation_tiny.md section 5). Every cell names all four knobs, so the
# packaged default (whatever it is) never leaks into a cell.
PAPER_GATE = ("rexmoe.gating=softmax_then_topk", "rexmoe.gate_normalization=none")
RENORM = ("rexmoe.gating=softmax_then_topk", "rexmoe.gate_normalization=renorm_topk")
RANDOM = ("rexmoe.psr.schedule=linear", "rexmoe.psr.protect_local=false", "rexmoe.psr.mask_draw=per_step")
PROTECT = ("rexmoe.psr.schedule=linear", "rexmoe.psr.protect_local=true", "rexmoe.psr.mask_draw=per_step")
NESTED = ("rexmoe.psr.schedule=linear", "rexmoe.psr.protect_local=false", "rexmoe.psr.mask_draw=nested")
VARIANTS = (
    _v("r1", "vanilla (r=1), softmax_then_topk", "rexmoe.reuse_group_size=1", *NO_PSR),
    _v("r1_t2s", "vanilla (r=1), topk_then_softmax", "rexmoe.reuse_group_size=1", *NO_PSR, T2S,
       baseline="r1_t2s"),
    _v("r4_layer_aux", "r=4, per-layer aux (paper gating)", *NO_PSR),
    _v("r4_group_aux", "r=4, group-pooled aux", *NO_PSR, *NO_AUX, "rexmoe.balance.group_aux_coeff=0.01"),
    _v("r4_bias_router", "r=4, aux-free bias, scope router", *NO_PSR, *NO_AUX, *BIAS,
       "rexmoe.balance.expert_bias_scope=router"),
    _v("r4_bias_physical", "r=4, aux-free bias, scope physical", *NO_PSR, *NO_AUX, *BIAS,
       "rexmoe.balance.expert_bias_scope=physical"),
    _v("r4_no_balance", "r=4, no balancing", *NO_PSR, *NO_AUX),
    _v("r4_psr_random", "r=4 + PSR linear, random masks", "rexmoe.psr.schedule=linear"),
    _v("r4_psr_protect", "r=4 + PSR linear, protect_local", "rexmoe.psr.schedule=linear",
       "rexmoe.psr.protect_local=true"),
    _v("r4_renorm", "r=4, kept gates renormalised", *NO_PSR, "rexmoe.gate_normalization=renorm_topk"),
    _v("r4_t2s", "r=4, topk_then_softmax", *NO_PSR, T2S, baseline="r1_t2s"),
    _v("r4_t2s_bias_physical", "r=4, topk_then_softmax + aux-free physical", *NO_PSR, T2S, *NO_AUX, *BIAS,
       "rexmoe.balance.expert_bias_scope=physical", baseline="r1_t2s"),
    # gate x PSR cross; renormalised gates at r=1 are exactly topk_then_softmax, hence that baseline
    _v("x_paper_none", "paper gate, no PSR", *PAPER_GATE, *NO_PSR),
    _v("x_paper_random", "paper gate, PSR random masks (the paper)", *PAPER_GATE, *RANDOM),
    _v("x_paper_protect", "paper gate, PSR protect_local", *PAPER_GATE, *PROTECT),
    _v("x_paper_nested", "paper gate, PSR nested masks", *PAPER_GATE, *NESTED),
    _v("x_renorm_none", "renorm_topk, no PSR", *RENORM, *NO_PSR, baseline="r1_t2s"),
    _v("x_renorm_random", "renorm_topk, PSR random masks", *RENORM, *RANDOM, baseline="r1_t2s"),
    _v("x_renorm_protect", "renorm_topk, PSR protect_local", *RENORM, *PROTECT, baseline="r1_t2s"),
    _v("x_renorm_nested", "renorm_topk, PSR nested masks", *RENORM, *NESTED, baseline="r1_t2s"),
    _v("x_renorm_nested_early", "renorm_topk, PSR nested masks, ramp 0 -> 0.3 of the run", *RENORM, *NESTED,
       baseline="r1_t2s", ramp=(0.0, 0.3)),
    _v("x_renorm_protect_early", "renorm_topk, PSR protect_local, ramp 0 -> 0.3 of the run", *RENORM,
       *PROTECT, baseline="r1_t2s", ramp=(0.0, 0.3)),
)


class RecipeError(Exception):
    """A bad input or a failed run: one line, exit status 2."""


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line
                continue
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def psr_steps(variant: Variant, steps: int) -> list[str]:
    """The PSR ramp's start / end steps: the variant's fractions of the run (ignored without PSR)."""
    start, end = (round(f * steps) for f in variant.ramp)
    return [f"rexmoe.psr.start_step={start}", f"rexmoe.psr.end_step={max(end, start + 1)}"]


def train(variant: Variant, seed: int, args, extra: list[str]) -> Path:
    run_dir = args.out / f"{variant.name}-s{seed}"
    if any(r.get("step") == args.steps and "val_loss" in r for r in _records(run_dir)):
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    psr = psr_steps(variant, args.steps)
    cmd = [sys.executable, "-m", "rexmoe_train.cli.train", f"train.seed={seed}", f"train.train_iters={args.steps}",
           f"train.eval_interval={max(1, args.steps // 5)}", f"train.eval_iters={args.eval_iters}",
           "run.progress=false", "run.wandb.mode=disabled", *psr, *variant.overrides, *extra,
           f"run.dir={run_dir}"]
    print(f"[ablation] {run_dir.name}: {' '.join(cmd[3:])}", flush=True)
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RecipeError(f"{run_dir.name}: training exited with status {proc.returncode}; see {run_dir}/train.log")
    return run_dir


def summarise_run(run_dir: Path) -> dict:
    records = _records(run_dir)
    evals = [r for r in records if "val_loss" in r]
    logged = [r for r in records if "load_violation_max" in r]
    if not evals or not logged:
        raise RecipeError(f"{run_dir.name}: no evaluation / router records in {run_dir}/metrics.jsonl")
    last = logged[-1]
    return {"val_loss": evals[-1]["val_loss"], "step": evals[-1]["step"],
            "val_curve": [(r["step"], r["val_loss"]) for r in evals],
            "maxvio": statistics.fmean(last["load_violation_max"]),
            "under_used": statistics.fmean(last["under_used_fraction"])}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def report(runs: dict, variants: list[Variant], seeds: list[int]) -> tuple[list[dict], str]:
    rows = []
    for v in variants:
        per_seed = [runs[(v.name, s)] for s in seeds]
        row = {"name": v.name, "label": v.label, "overrides": list(v.overrides), "baseline": v.baseline,
               "seeds": seeds, "val_loss": _spread([r["val_loss"] for r in per_seed]),
               "maxvio": _spread([r["maxvio"] for r in per_seed]),
               "under_used": _spread([r["under_used"] for r in per_seed]), "runs": per_seed}
        if (v.baseline, seeds[0]) in runs and v.name != v.baseline:
            deltas = [runs[(v.name, s)]["val_loss"] - runs[(v.baseline, s)]["val_loss"] for s in seeds]
            row["delta_vs_baseline"] = deltas
            # "beats" = better in every seed and by more than the baseline's own seed spread
            base = _spread([runs[(v.baseline, s)]["val_loss"] for s in seeds])
            margin = -statistics.fmean(deltas)
            row["beats_baseline"] = all(d < 0 for d in deltas) and margin > (base["max"] - base["min"])
        rows.append(row)
    lines = [f"Seeds {', '.join(map(str, seeds))}; final validation loss on the same held-out windows for "
             "every run (mean, min..max over seeds); Δ: per-seed difference to vanilla with the same gating.",
             "",
             "| variant | val loss mean (min..max) | Δ vs vanilla per seed | beats vanilla | MaxVio | under-used |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vl = r["val_loss"]
        delta = ", ".join(f"{d:+.4f}" for d in r.get("delta_vs_baseline", [])) or "—"
        beats = {True: "yes", False: "no"}.get(r.get("beats_baseline"), "—")
        lines.append(f"| {r['label']} | {vl['mean']:.4f} ({vl['min']:.4f}..{vl['max']:.4f}) | {delta} | {beats} | "
                     f"{r['maxvio']['mean']:.3f} | {r['under_used']['mean']:.3f} |")
    return rows, "\n".join(lines) + "\n"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # bad input: one line, exit 2 (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv=None):
    p = _OneLineParser(prog="recipes/ablation_tiny/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ablation_tiny")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--eval-iters", type=int, default=16, help="held-out micro-batches per evaluation")
    p.add_argument("--only", nargs="+", metavar="NAME", help=" | ".join(v.name for v in VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (default 1)")
    p.add_argument("--report-only", action="store_true")
    options, overrides = split_overrides(argv)
    args, extra = p.parse_known_args(options)
    extra += overrides
    check_overrides_and_only(p, extra, args.only, [v.name for v in VARIANTS])
    for option, value, least in (("--steps", args.steps, 5), ("--eval-iters", args.eval_iters, 1),
                                 ("--jobs", args.jobs, 1)):
        if value < least:
            p.error(f"{option} {value}: must be >= {least}")
    args.out = args.out.resolve()
    return args, extra


def main(argv=None) -> int:
    args, extra = parse(argv)
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    began = time.perf_counter()
    runs = {}
    # seed-major: a partial grid already compares every variant on one seed
    todo = [(v, seed) for seed in args.seeds for v in chosen]
    try:
        if args.report_only:
            dirs = [args.out / f"{v.name}-s{seed}" for v, seed in todo]
        else:
            with ThreadPoolExecutor(args.jobs) as pool:  # each job is a training subprocess
                dirs = list(pool.map(lambda job: train(*job, args, extra), todo))
        for (v, seed), run_dir in zip(todo, dirs):
            runs[(v.name, seed)] = summarise_run(run_dir)
    except RecipeError as err:
        print(f"[ablation] error: {err}", file=sys.stderr)
        return 2
    rows, table = report(runs, chosen, args.seeds)
    (args.out / "results.json").write_text(json.dumps({"steps": args.steps, "seeds": args.seeds,
                                                       "overrides": extra, "variants": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text(table)
    print(table, flush=True)
    print(f"[ablation] {args.out / 'results.md'} ({(time.perf_counter() - began) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
