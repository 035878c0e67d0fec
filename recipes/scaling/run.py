#!/usr/bin/env python3
"""Does reuse pay with tokens? Long runs of vanilla, the default r=4 and r=4 + PSR, in resumable pieces.

    python recipes/scaling/run.py [--out runs/scaling] [--steps 3000] [--seeds 42 43]
                                  [--budget-minutes M] [--deadline HH:MM] [--report] [--status]

Each invocation visits the unfinished (setting, seed) runs in a fixed order (seed-major, then
vanilla, r4, r4_psr) and advances each by an equal share of the wall-clock budget: the training is
started with the same overrides every time (so `rexmoe-train` resumes from the run dir's last
checkpoint, bitwise), stopped with SIGTERM when its slice is spent (the trainer saves at the next
step boundary and exits 75), and the next run is started. One training process at a time, with
OMP_NUM_THREADS=1; run the script under `nice -n 19`. SIGTERM / Ctrl-C to the script stops the
current training the same way (nothing lost) and ends the invocation. Two invocations may run side
by side on disjoint seeds (`--seeds 42` and `--seeds 43`, each niced): a run is trained by one
invocation at a time (a lock per run under locks/), and progress.json / manifest.json are updated
under one lock, re-read first, so neither invocation loses the other's slices.

Writes to --out: data/ (the frozen corpus, recipes/scaling/corpus.py; built on the first call),
<setting>-s<seed>/ (run dirs), progress.json (per run: steps done, CPU and wall seconds spent,
slices, last exit status), progress.jsonl (one line per slice) and manifest.json (run dirs grouped
by setting, for `rexmoe-plot scaling --manifest`). --report prints the table of docs/scaling.md
(mean +- sd per eval point, Delta vs vanilla, slope of Delta over the last third) and the verdict
of the rule written there, or says the runs are partial. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
REPO = RECIPE.parents[1]
sys.path.insert(0, str(RECIPE))
import corpus  # noqa: E402

USAGE, PREEMPTED = 2, 75  # rexmoe_train.exit_codes.ExitCode values (kept import-free: no torch here)
# the paper's 2.3B PSR ramp (10k -> 30k of 47.7k steps) as fractions of the run
PSR_START, PSR_END = 10_000 / 47_700, 30_000 / 47_700
# the packaged default of configs/rexmoe/default.yaml, pinned so that a later change of the default
# cannot change a run that is resumed in a later session
DEFAULT_GATE = ("rexmoe.gating=softmax_then_topk", "rexmoe.gate_normalization=renorm_topk",
                "rexmoe.psr.mask_on=scores", "rexmoe.psr.mask_draw=nested", "rexmoe.psr.protect_local=false")


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    reuse: int
    psr: str  # none | linear

    def overrides(self, steps: int) -> list[str]:
        start = round(PSR_START * steps)
        end = max(round(PSR_END * steps), start + 1)
        return [f"rexmoe.reuse_group_size={self.reuse}", *DEFAULT_GATE, f"rexmoe.psr.schedule={self.psr}",
                f"rexmoe.psr.start_step={start}", f"rexmoe.psr.end_step={end}"]


SETTINGS = (
    Setting("vanilla", "vanilla MoE (r=1)", 1, "none"),
    Setting("r4", "r=4, the default (renormalised gates, PSR off)", 4, "none"),
    Setting("r4_psr", "r=4 + PSR (nested masks, linear over 0.21-0.63 of the run)", 4, "linear"),
)
BASELINE = "vanilla"


class RecipeError(Exception):
    """Bad input or a failed run: one line."""


def run_name(setting: Setting, seed: int) -> str:
    return f"{setting.name}-s{seed}"


def train_command(setting: Setting, seed: int, args, data: dict) -> list[str]:
    """The same list on every invocation: that is what makes rexmoe-train resume the run."""
    return [sys.executable, "-m", "rexmoe_train.cli.train", "model=tiny", f"train.seed={seed}",
            f"train.train_iters={args.steps}", f"train.eval_interval={args.eval_interval}",
            f"train.eval_iters={args.eval_iters}", "train.log_interval=10",
            f"checkpoint.save_interval={args.save_interval}", "run.progress=false", "run.wandb.mode=disabled",
            "data.source=indexed", f"data.blend=[{data['prefix']}]", f"data.split='{data['split']}'",
            *setting.overrides(args.steps), f"run.dir={args.out / run_name(setting, seed)}"]


def last_step(run_dir: Path) -> int:
    """The step the run would resume from: its latest checkpoint (0 before any)."""
    pointer = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    try:
        return int(pointer.read_text().strip())
    except (OSError, ValueError):
        return 0


def finished(run_dir: Path, steps: int) -> bool:
    """The run's final checkpoint (step --steps) is in."""
    return last_step(run_dir) >= steps


def background(pid: int) -> None:
    """Give the training's session the lowest CPU share. On a kernel with autogroup scheduling
    (/proc/sys/kernel/sched_autogroup_enabled) a new session is a new scheduling group whose own
    nice is 0: the process's nice 19 then ranks it only against its own session, and the training
    takes an equal share of the cores from a test suite started in another terminal."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write("19")
    except OSError:  # no autogroup (or not allowed): plain nice is all there is
        pass


def load_progress(out: Path) -> dict:
    path = out / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def save_progress(out: Path, progress: dict) -> None:
    progress["updated"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    progress["cpu_s_total"] = round(sum(r.get("cpu_s", 0.0) for r in progress["runs"].values()), 1)
    tmp = out / "progress.json.tmp"
    tmp.write_text(json.dumps(progress, indent=2) + "\n")
    os.replace(tmp, out / "progress.json")


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = True):
    """An exclusive flock on PATH for the with-block; yields False (and holds nothing) when WAIT is
    false and another invocation holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_progress(out: Path, seeds: list[int], steps: int, change=lambda progress: None) -> dict:
    """Re-read progress.json under the lock, merge this invocation's seeds, apply CHANGE, write it and
    manifest.json back: an invocation running beside this one on other seeds keeps its entries."""
    with locked(out / "locks" / "progress.lock"):
        progress = load_progress(out)
        all_seeds = sorted(set(progress.get("seeds", [])) | set(seeds))
        progress.update(steps=steps, seeds=all_seeds)
        change(progress)
        save_progress(out, progress)
        write_manifest(out, all_seeds, steps)
        return progress


def record_slice(out: Path, name: str, fields: dict, result: dict, seeds: list[int], steps: int) -> dict:
    """Add one slice to progress.json and manifest.json (update_progress)."""
    def add(progress: dict) -> None:
        entry = progress["runs"].setdefault(name, {**fields, "cpu_s": 0.0, "wall_s": 0.0, "slices": 0})
        entry.update(step=fields["step"], target=steps, last_exit=result["exit"], finished=fields["finished"])
        entry["cpu_s"] = round(entry["cpu_s"] + result["cpu_s"], 1)
        entry["wall_s"] = round(entry["wall_s"] + result["wall_s"], 1)
        entry["slices"] += 1

    return update_progress(out, seeds, steps, add)


def write_manifest(out: Path, seeds: list[int], steps: int) -> Path:
    """The started runs grouped by setting (rewritten after every slice), for `rexmoe-plot scaling`."""
    path = out / "manifest.json"
    started = {s.name: [str(out / run_name(s, seed)) for seed in seeds
                        if (out / run_name(s, seed) / "metrics.jsonl").is_file()] for s in SETTINGS}
    path.write_text(json.dumps({
        "baseline": BASELINE, "steps": steps, "seeds": seeds,
        "labels": {s.name: s.label for s in SETTINGS},
        "settings": {name: dirs for name, dirs in started.items() if dirs},
    }, indent=2) + "\n")
    return path


class Stop:
    """SIGTERM / SIGINT to the recipe: stop the current training cleanly, then end the invocation."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def advance(cmd: list[str], run_dir: Path, seconds: float, stop: Stop, grace: float) -> dict:
    """Train for about `seconds` of wall time, then SIGTERM; returns exit status, CPU and wall seconds."""
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    began = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(run_dir / "train.log", "a") as log:
        log.write(f"\n[scaling] {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: slice of "
                  f"{seconds / 60:.1f} min\n")
        log.flush()
        # its own session: a Ctrl-C at the terminal reaches the recipe only, which stops it cleanly
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        background(proc.pid)
        sent = None
        while proc.poll() is None:
            now = time.monotonic()
            if sent is None and (now - began >= seconds or stop.requested):
                proc.send_signal(signal.SIGTERM)  # the trainer saves at the next step boundary, exits 75
                sent = now
            elif sent is not None and now - sent > grace:
                proc.kill()  # resumes from the last interval checkpoint
            time.sleep(1.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"exit": proc.returncode, "cpu_s": round(cpu, 1), "wall_s": round(time.monotonic() - began, 1),
            "stopped": sent is not None}


def tree_state() -> str:
    """The code a slice ran: HEAD, plus a digest of the uncommitted changes to tracked files (the
    runs resume on whatever tree is checked out, so each slice records it)."""
    import hashlib
    import subprocess

    def git(*cmd):
        proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True)
        return proc.stdout if proc.returncode == 0 else b""

    head = git("rev-parse", "--short=12", "HEAD").decode().strip() or "unknown"
    diff = git("diff", "HEAD", "--", "rexmoe_train", "configs")
    return head + (f"+dirty:{hashlib.sha256(diff).hexdigest()[:12]}" if diff else "")


def deadline_from(args) -> float:
    """Seconds from now until this invocation must be done (the smaller of budget and deadline)."""
    limits = []
    if args.budget_minutes is not None:
        limits.append(args.budget_minutes * 60)
    if args.deadline is not None:
        now = dt.datetime.now(dt.timezone.utc)
        hh, mm = args.deadline
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if end <= now:
            raise RecipeError(f"--deadline {hh:02d}:{mm:02d}: already passed (now {now:%H:%M} UTC)")
        limits.append((end - now).total_seconds())
    return min(limits)


def train_all(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        data = corpus.ensure(args.data or args.out / "data", REPO / ".venv" / "lib" / "python3.11" / "site-packages")
    except (FileNotFoundError, RuntimeError) as err:
        raise RecipeError(str(err)) from None
    update_progress(args.out, args.seeds, args.steps,
                    lambda progress: progress.update(corpus_sha256=data["corpus_sha256"]))
    stop = Stop()
    end = time.monotonic() + deadline_from(args)
    todo = [(s, seed) for seed in args.seeds for s in SETTINGS if not args.only or s.name in args.only
            if not finished(args.out / run_name(s, seed), args.steps)]
    failed = []
    for i, (setting, seed) in enumerate(todo):
        left = end - time.monotonic() - args.grace_minutes * 60  # keep time to stop the last run
        slice_s = left / (len(todo) - i)
        if stop.requested or slice_s < args.min_slice_minutes * 60:
            print(f"[scaling] {len(todo) - i} run(s) not visited: "
                  f"{'stopped' if stop.requested else 'budget spent'}", flush=True)
            break
        name = run_name(setting, seed)
        run_dir = args.out / name
        with locked(args.out / "locks" / f"{name}.lock", wait=False) as mine:
            if not mine:
                print(f"[scaling] {name}: another invocation is training it; skipped", flush=True)
                continue
            cmd = train_command(setting, seed, args, data)
            print(f"[scaling] {name}: from step {last_step(run_dir)}, slice {slice_s / 60:.1f} min", flush=True)
            tree = tree_state()
            result = advance(cmd, run_dir, slice_s, stop, args.grace_minutes * 60)
            step = last_step(run_dir)
        fields = {"setting": setting.name, "seed": seed, "dir": str(run_dir), "step": step,
                  "finished": finished(run_dir, args.steps)}
        progress = record_slice(args.out, name, fields, result, args.seeds, args.steps)
        with open(args.out / "progress.jsonl", "a") as f:
            f.write(json.dumps({"run": name, "time": progress["updated"], "step": step, "tree": tree, **result}) + "\n")
        print(f"[scaling] {name}: step {step}/{args.steps}, exit {result['exit']}, "
              f"{result['cpu_s'] / 60:.1f} CPU min, {result['wall_s'] / 60:.1f} wall min", flush=True)
        if result["exit"] == USAGE:
            raise RecipeError(f"{name}: the trainer refused the command (exit 2); see {run_dir / 'train.log'}")
        if result["exit"] not in (0, PREEMPTED):
            failed.append(name)
    if failed:
        print(f"[scaling] error: {', '.join(failed)} exited abnormally; see their train.log", file=sys.stderr)
        return 1
    return 0


def status(args) -> str:
    progress = load_progress(args.out)
    lines = ["| run | steps | CPU min | wall min | slices | last exit |", "|---|---|---|---|---|---|"]
    for s_seed in [(s, seed) for seed in args.seeds for s in SETTINGS]:
        name = run_name(*s_seed)
        entry = progress["runs"].get(name, {})
        step = last_step(args.out / name)
        lines.append(f"| {name} | {step}/{args.steps} | {entry.get('cpu_s', 0) / 60:.1f} | "
                     f"{entry.get('wall_s', 0) / 60:.1f} | {entry.get('slices', 0)} | {entry.get('last_exit', '-')} |")
    lines.append(f"\nCPU time so far: {progress.get('cpu_s_total', 0) / 3600:.2f} h")
    return "\n".join(lines)


def report(args) -> str:
    """The table and the verdict of docs/scaling.md's rule (or 'partial')."""
    from rexmoe_train.tools.plot import PlotError, scaling_summary, scaling_table

    groups, missing = {}, []
    for s in SETTINGS:
        for seed in args.seeds:
            run_dir = args.out / run_name(s, seed)
            if (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file():
                groups.setdefault(s.name, []).append(run_dir)
            else:
                missing.append(run_name(s, seed))
    if BASELINE not in groups:
        raise RecipeError(f"no {BASELINE} run has started yet under {args.out}")
    try:
        summary = scaling_summary(groups, baseline=BASELINE)
    except PlotError as err:
        raise RecipeError(str(err)) from None
    return "\n".join([scaling_table(summary), "", verdict(summary, args.steps, missing)])


def verdict(summary: dict, steps: int, missing: list[str] = ()) -> str:
    """docs/scaling.md, "The rule": reuse pays for a setting when, at the final evaluation (step
    --steps), the mean over seeds of its per-seed Delta vs vanilla is below 0 and every seed's Delta
    is below 0. No verdict until every run of every setting has reached --steps."""
    done = {name: min(g["last_steps"]) for name, g in summary["settings"].items()}
    if missing or any(step < steps for step in done.values()):
        shown = ", ".join(f"{name} {step}/{steps}" for name, step in done.items())
        absent = f"; not started: {', '.join(missing)}" if missing else ""
        return (f"PARTIAL (fewest evaluated steps per setting: {shown}{absent}): no verdict until every run "
                f"reaches step {steps}.")
    out = []
    for name, delta in summary["delta"].items():
        final = delta["points"][-1]
        if final["step"] != steps:
            out.append(f"{name}: no paired evaluation at step {steps}")
            continue
        pays = final["mean"] < 0 and all(d < 0 for d in final["values"])
        per_seed = ", ".join(f"{d:+.4f}" for d in final["values"])
        out.append(f"{name}: Delta at step {steps} = {final['mean']:+.4f} (seeds: {per_seed}) -> "
                   f"{'reuse PAYS' if pays else 'reuse does not pay'}")
    return "\n".join(out)


def _routing_window(run_dir: Path, step: int, window: int) -> dict | None:
    """Means over the logged records in (step - window, step] of: the share of each router's
    assignments going to other layers' experts (1 - reuse_matrix diagonal), MaxVio, load entropy and
    under-used share per layer, and the PSR candidate count."""
    import statistics

    records = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if step - window < r.get("step", -1) <= step and "reuse_matrix" in r:
            records.append(r)
    if not records:
        return None

    def per_layer(key):
        return [round(statistics.fmean(col), 3) for col in zip(*(r[key] for r in records if key in r))]

    other = [[1.0 - m[i][i] for m in r["reuse_matrix"] for i in range(len(m))] for r in records]
    return {"records": len(records), "other_layers": [round(statistics.fmean(c), 3) for c in zip(*other)],
            "maxvio": per_layer("load_violation_max"),
            "entropy": per_layer("load_entropy"), "under_used": per_layer("under_used_fraction"),
            "candidates": records[-1].get("psr_candidates")}


def explain(args, window: int = 100) -> str:
    """Routing over time for the r=4 runs: one row per evaluation step, means over the last `window`
    steps' logged records (docs/scaling.md section 4)."""
    lines = []
    for seed in args.seeds:
        for setting in SETTINGS:
            if setting.reuse == 1:
                continue
            run_dir = args.out / run_name(setting, seed)
            lines += [f"\n{run_name(setting, seed)} (to step {last_step(run_dir)} of {args.steps}); per MoE layer "
                      f"0-3, means over the {window} steps before each evaluation:", "",
                      "| step | candidates | to other layers' experts | MaxVio | load entropy | under-used |",
                      "|---|---|---|---|---|---|"]
            for step in range(args.eval_interval, args.steps + 1, args.eval_interval):
                w = _routing_window(run_dir, step, window)
                if w is None:
                    break
                lines.append(f"| {step} | {w['candidates']} | {' / '.join(f'{v:.2f}' for v in w['other_layers'])} | "
                             f"{' / '.join(f'{v:.2f}' for v in w['maxvio'])} | "
                             f"{' / '.join(f'{v:.3f}' for v in w['entropy'])} | "
                             f"{' / '.join(f'{v:.3f}' for v in w['under_used'])} |")
    return "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # bad input: one line, exit 2 (no usage block)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def _hhmm(text: str) -> tuple[int, int]:
    try:
        hh, mm = (int(x) for x in text.split(":"))
        if 0 <= hh < 24 and 0 <= mm < 60:
            return hh, mm
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: must be HH:MM (UTC), e.g. 19:15")


def parse(argv=None):
    p = _OneLineParser(prog="recipes/scaling/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "scaling")
    p.add_argument("--data", type=Path, help="the corpus folder (default OUT/data; built there when missing)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--only", nargs="+", choices=[s.name for s in SETTINGS], help="train only these settings")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=32, help="validation micro-batches (4 x 256 tokens each)")
    p.add_argument("--save-interval", type=int, default=125)
    p.add_argument("--budget-minutes", type=float, help="wall-clock minutes for this invocation")
    p.add_argument("--deadline", type=_hhmm, help="HH:MM UTC by which this invocation has stopped")
    p.add_argument("--min-slice-minutes", type=float, default=4.0, help="shorter slices are not started")
    p.add_argument("--grace-minutes", type=float, default=3.0, help="time a stopped training has to save")
    p.add_argument("--report", action="store_true", help="no training: the table and the verdict")
    p.add_argument("--status", action="store_true", help="no training: steps and CPU time per run")
    p.add_argument("--explain", action="store_true", help="no training: routing metrics of the r=4 runs over time")
    args = p.parse_args(argv)
    for option, value, least in (("--steps", args.steps, 1), ("--eval-interval", args.eval_interval, 1),
                                 ("--eval-iters", args.eval_iters, 1), ("--save-interval", args.save_interval, 0)):
        if value < least:
            p.error(f"{option} {value}: must be >= {least}")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        p.error(f"--budget-minutes {args.budget_minutes}: must be > 0")
    if not (args.report or args.status or args.explain) and args.budget_minutes is None and args.deadline is None:
        p.error("give --budget-minutes and/or --deadline (or --report / --status)")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: must be distinct")
    args.out = args.out.resolve()
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.status:
            print(status(args))
            return 0
        if args.report:
            print(report(args))
            return 0
        if args.explain:
            print(explain(args))
            return 0
        return train_all(args)
    except RecipeError as err:
        print(f"[scaling] error: {err}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
