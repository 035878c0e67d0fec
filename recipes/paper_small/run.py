#!/usr/bin/env python3
"""The paper's claims at small scale: vanilla MoE vs cross-layer reuse with and without PSR.

    python recipes/paper_small/run.py [--out runs/paper_small] [--steps 600] [--only NAME ...]
                                      [--nproc N] [--eval-batches 32] [--report-only]
                                      [--data PREFIX [--tokenizer T]] [HYDRA_OVERRIDE ...]

Trains the six variants below one after another, each from the same seed on the same tokens in the
same order (only the model's reuse / PSR settings differ), then evaluates every final checkpoint with
`rexmoe-eval` on the same held-out batches and writes to --out:

  results.json   every number below, per run
  results.md     the table: val loss / perplexity, MaxVio ("LBV") and under-used experts per layer,
                 router parameters and their overhead versus vanilla
  val_loss.png   validation loss vs training tokens for all runs (from each run's metrics.jsonl)

PSR ramps follow the paper's 2.3B run scaled to --steps: linear from 21% to 63% of training
(10k -> 30k of 47.7k steps); stepwise adds one layer's worth of candidates at 21% / 42% / 63%
(the paper's 128/192/256 at 10k/20k/30k). Settings are the same for every run; nothing is tuned
per variant. A run whose metrics already reach --steps is not trained again (re-running the script
resumes an interrupted recipe: the trainer continues from the run's last checkpoint).

Another corpus: `--data PREFIX` (a rexmoe-preprocess output, with `--tokenizer` if it was not the byte
tokenizer), or any `data.*` override. Larger scale: any Hydra override, e.g. `--nproc 8
model=rexmoe_0.5b train=paper --steps 47700` (the r=8 run needs a layer count divisible by 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
REPO = RECIPE.parents[1]
sys.path.insert(0, str(RECIPE.parent))  # recipes/_args.py, shared by the recipe scripts
from _args import check_overrides_and_only, split_overrides  # noqa: E402

# the paper's 2.3B ramp as fractions of its 47.7k steps
PSR_START, PSR_END = 10_000 / 47_700, 30_000 / 47_700


@dataclass(frozen=True)
class Variant:
    name: str
    reuse: int
    psr: str  # none | linear | stepwise
    label: str

    def overrides(self, steps: int) -> list[str]:
        start = 0 if self.psr == "stepwise" else round(PSR_START * steps)  # stepwise: +N at each 1/3
        end = max(round(PSR_END * steps), start + 1)
        return [f"rexmoe.reuse_group_size={self.reuse}", f"rexmoe.psr.schedule={self.psr}",
                f"rexmoe.psr.start_step={start}", f"rexmoe.psr.end_step={end}"]


VARIANTS = (
    Variant("r1", 1, "none", "vanilla MoE (r=1)"),
    Variant("r2_nopsr", 2, "none", "reuse r=2, no PSR"),
    Variant("r4_nopsr", 4, "none", "reuse r=4, no PSR"),
    Variant("r4_linear", 4, "linear", "reuse r=4 + PSR linear"),
    Variant("r4_stepwise", 4, "stepwise", "reuse r=4 + PSR stepwise"),
    Variant("r8_linear", 8, "linear", "reuse r=8 + PSR linear"),
)


class RecipeError(Exception):
    """A bad input or a failed run: one line, exit status 2."""


def _python() -> str:
    return sys.executable


def train_command(variant: Variant, args, extra: list[str]) -> list[str]:
    entry = ["-m", "rexmoe_train.cli.train"]
    if args.nproc > 1:
        launcher = [_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    else:
        launcher = [_python()]
    data = []
    if args.data:
        data = ["data.source=indexed", f"data.blend=[{args.data}]", f"data.tokenizer={args.tokenizer}"]
    return [*launcher, *entry,
            f"hydra.searchpath=[file://{RECIPE / 'configs'}]", "model=paper_small", "train=paper_small",
            f"train.train_iters={args.steps}", "run.wandb.mode=disabled", "run.progress=false",
            *variant.overrides(args.steps), *data,
            *extra,  # the user's overrides win
            f"run.dir={args.out / variant.name}"]


def _records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (torn lines skipped); [] before the run has logged any."""
    from rexmoe_train.tools.plot import PlotError, load_records

    try:
        return load_records(run_dir)
    except PlotError:  # no run dir, no metrics.jsonl or no records yet
        return []


def _finished(run_dir: Path, steps: int) -> bool:
    return any(r.get("step") == steps for r in _records(run_dir)) and (run_dir / "checkpoints").is_dir()


def _env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher's leftovers would make the child join a stale world
    return env


def run_variant(variant: Variant, args, extra: list[str]) -> float:
    run_dir = args.out / variant.name
    if _finished(run_dir, args.steps):
        print(f"[paper_small] {variant.name}: already trained to step {args.steps}", flush=True)
        return 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(variant, args, extra)
    print(f"[paper_small] {variant.name}: {' '.join(cmd[1:])}", flush=True)
    began = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise RecipeError(f"{variant.name}: training exited with status {proc.returncode}; "
                          f"see {run_dir / 'train.log'}")
    print(f"[paper_small] {variant.name}: trained in {seconds / 60:.1f} min", flush=True)
    return seconds


def evaluate_variant(variant: Variant, args) -> dict:
    run_dir = args.out / variant.name
    out = run_dir / "eval.json"
    cmd = [_python(), "-m", "rexmoe_train.cli.eval", str(run_dir / "checkpoints"),
           "--batches", str(args.eval_batches), "--out", str(out),
           "--overwrite"]  # a rerun evaluates again and replaces its own eval.json (rexmoe-eval marks it)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RecipeError(f"{variant.name}: rexmoe-eval failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return json.loads(out.read_text())


def summarise(variant: Variant, run_dir: Path, ev: dict, vanilla_routers: int | None, steps: int) -> dict:
    records = _records(run_dir)
    model = json.loads((run_dir / "model.json").read_text())
    config = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(cfg_path))
    t = config.get("train", {})
    tokens_per_step = t.get("global_batch_size", 0) * t.get("seq_length", 0)
    curve = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records if "val_loss" in r]
    router = ev["router"]
    maxvio = router["load_violation_max"]
    under = router["under_used_fraction"]
    routers = int(model["parameters_routers"])
    times = [r["step_time_s"] for r in records if r.get("step_time_s")]
    return {
        "name": variant.name,
        "label": variant.label,
        "reuse_group_size": variant.reuse,
        "psr": variant.psr,
        "psr_overrides": variant.overrides(steps)[1:],
        "step": ev["step"],
        "tokens": ev["step"] * tokens_per_step,
        "val_loss": ev["val_loss"],
        "perplexity": ev["perplexity"],
        "eval_tokens": ev["tokens"],
        "maxvio_mean": sum(maxvio) / len(maxvio),
        "maxvio_max": max(maxvio),
        "maxvio_per_layer": maxvio,
        "group_maxvio": router["group_load_violation_max"],
        "under_used_mean": sum(under) / len(under),
        "under_used_per_layer": under,
        "parameters_total": int(model["parameters_total"]),
        "parameters_routers": routers,
        "router_overhead": None if vanilla_routers is None else routers - vanilla_routers,
        "router_overhead_pct": (None if vanilla_routers is None
                                else 100.0 * (routers - vanilla_routers) / int(model["parameters_total"])),
        "val_curve": curve,
        # metrics.jsonl times only the logged steps (every train.log_interval): their median, not a
        # sum, which would count one step in log_interval
        "step_time_s_median": statistics.median(times) if times else None,
    }


def markdown(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["name"] == "r1"), None)
    lines = [
        f"Same seed and tokens for every run ({rows[0]['tokens']:,} training tokens); eval: "
        f"{rows[0]['eval_tokens']:,} held-out tokens, all r*N candidates open. MaxVio ('LBV'): "
        "(max load - mean load) / mean load over a layer's candidates, mean over layers (max in "
        "brackets); under-used: share of a router's candidates receiving < 10% of the uniform share, "
        "mean over layers; router overhead: extra router rows versus vanilla ((r-1)*N*hidden per layer).",
        "",
        "| run | val loss | Δ vs r=1 | perplexity | MaxVio mean (max) | under-used | router params | overhead vs r=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if base is None or r is base else f"{r['val_loss'] - base['val_loss']:+.4f}"
        overhead = ("—" if r["router_overhead"] is None else
                    f"+{r['router_overhead']:,} ({r['router_overhead_pct']:.2f}% of total)")
        lines.append(f"| {r['label']} | {r['val_loss']:.4f} | {delta} | {r['perplexity']:.3f} | "
                     f"{r['maxvio_mean']:.3f} ({r['maxvio_max']:.3f}) | {r['under_used_mean']:.3f} | "
                     f"{r['parameters_routers']:,} | {overhead} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs = [x / 1e6 for x, _ in r["val_curve"]]
        ys = [y for _, y in r["val_curve"]]
        ax.plot(xs, ys, marker=".", label=r["label"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    finals = [y for r in rows for _, y in r["val_curve"][len(r["val_curve"]) // 3:]]
    if finals:  # zoom on the part of training where the runs differ
        ax.set_ylim(min(finals) - 0.05, max(finals) + 0.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("paper_small: validation loss")
    fig.tight_layout()
    path = out / "val_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv=None):
    p = argparse.ArgumentParser(prog="recipes/paper_small/run.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "paper_small")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    p.add_argument("--only", nargs="+", metavar="NAME", help=" | ".join(v.name for v in VARIANTS))
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) (default 1)")
    p.add_argument("--eval-batches", type=int, default=32, help="held-out micro-batches (default 32)")
    p.add_argument("--report-only", action="store_true", help="no training: evaluate and report what exists")
    p.add_argument("--data", help="a rexmoe-preprocess output prefix to train on instead of the embedded corpus")
    p.add_argument("--tokenizer", default="byte", help="with --data: byte or the tokenizer.json used")
    options, overrides = split_overrides(argv)
    args, extra = p.parse_known_args(options)
    extra += overrides
    check_overrides_and_only(p, extra, args.only, [v.name for v in VARIANTS])
    for opt in ("steps", "nproc", "eval_batches"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')}={getattr(args, opt)}: must be >= 1")
    args.out = args.out.resolve()
    return args, extra


def main(argv=None) -> int:
    args, extra = parse(argv)
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    began = time.perf_counter()
    try:
        if not args.report_only:
            for variant in chosen:
                run_variant(variant, args, extra)
        evals = {}
        for variant in chosen:
            if not (args.out / variant.name / "checkpoints").is_dir():
                raise RecipeError(f"{variant.name}: no checkpoint under {args.out / variant.name}")
            evals[variant.name] = evaluate_variant(variant, args)
    except RecipeError as err:
        print(f"[paper_small] error: {err}", file=sys.stderr)
        return 2
    vanilla = args.out / "r1" / "model.json"
    vanilla_routers = int(json.loads(vanilla.read_text())["parameters_routers"]) if vanilla.is_file() else None
    rows = [summarise(v, args.out / v.name, evals[v.name], vanilla_routers, args.steps) for v in chosen]
    table = markdown(rows, args)
    (args.out / "results.json").write_text(json.dumps({"steps": args.steps, "overrides": extra,
                                                       "runs": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text(table)
    png = plot(rows, args.out)
    print(table, flush=True)
    print(f"[paper_small] {args.out / 'results.md'}, results.json, {png.name} "
          f"({(time.perf_counter() - began) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
