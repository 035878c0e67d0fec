#!/usr/bin/env python3
"""Training stall per checkpoint save: blocking (checkpoint.async_save=false) against asynchronous
(megatron's async dist-checkpointing, rexmoe_train/checkpoint/manager.py).

    OMP_NUM_THREADS=1 python bench/async_save_bench.py [--nproc 1,2] [--repeats 2] [--out r.json] \
        [HYDRA_OVERRIDE ...]

For each process count, one torchrun job (or one process) builds a Trainer (default: a wider tiny
model, hidden 512: about 330 MiB of weights and Adam state in its checkpoint) and trains, after
warm-up steps and one untimed save, segments of --steps steps in turn, --repeats rounds:

  none   no save                                   (the baseline)
  sync   a blocking save every --every steps
  async  an async save every --every steps; the segment ends with the last save finalized

Measured per save, on rank 0:

  blocked   the time the training loop spends inside CheckpointManager.save() and the .finalize()
            that completes that save (planning, common.pt, the fork; for async the finalize steps:
            .metadata, gathering the digests, manifest, rename, pointer)
  polls     async only: the .finalize() calls after steps that found a write still running (one
            all_reduce each; with several ranks it also absorbs their step-time imbalance, which
            a run without saves pays at its next collective instead)
  extra     (segment wall time - the median `none` segment) / saves: what the save costs the run,
            including the writer processes competing with training for the same cores

Prints a table and JSON (--out): stall of async as a share of the blocking save. Speed targets are
met here, not in tests.

--breakdown: where the async stall goes, per rank: the median seconds per async save spent in each
step of save() and of the finalize() that completes it (nested: "save" contains the others of its
phase, "finalize_save" contains "finish"), from timers around the manager's and megatron's functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = ["model.hidden_size=512", "model.moe_ffn_hidden_size=512", "train.seq_length=32",
            "train.micro_batch_size=1", "train.global_batch_size=4", "rexmoe.psr.schedule=none",
            "train.log_interval=1000000", "train.eval_interval=1000000", "train.eval_iters=1",
            "run.progress=false", "run.wandb.mode=disabled", "checkpoint.keep_last_n=1"]
MODES = ("none", "sync", "async")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Breakdown:
    """Timers around the functions an async save passes through (this bench's process only)."""

    def __init__(self) -> None:
        self.active = False
        self.totals: dict[str, float] = {}
        self.per_save: list[dict[str, float]] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - began

        setattr(owner, name, timed)

    def install(self, trainer) -> None:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        from rexmoe_train.checkpoint import layout, manager

        ck = trainer.checkpoints
        self.wrap(manager.CheckpointManager, "save", "save")
        self.wrap(type(ck.model), "all_finite", "all_finite")
        for name in ("any_rank", "_broadcast_object", "_global_max"):
            self.wrap(manager, name, f"collective:{name}")
        self.wrap(manager.CheckpointManager, "_sharded_state", "sharded_state_dict")
        self.wrap(dist_checkpointing, "save", "megatron_plan_and_common_pt")
        self.wrap(FileSystemWriterAsync, "prepare_write_data", "megatron_prepare_write_data(clone)")
        self.wrap(AsyncCallsQueue, "schedule_async_request", "fork_writer")
        self.wrap(AsyncCallsQueue, "maybe_finalize_async_calls", "finalize")
        self.wrap(manager.CheckpointManager, "_finalize_save", "finalize_save")
        self.wrap(manager.CheckpointManager, "_finish", "finish(rank0: manifest,fsync,rename,pointer)")
        self.wrap(layout, "write_manifest", "write_manifest")
        self.wrap(layout, "fsync_tree", "fsync_tree")
        for name in ("barrier", "all_gather_object"):
            self.wrap(dist, name, f"collective:{name}")

    def end_save(self) -> None:
        self.per_save.append(self.totals)
        self.totals = {}

    def medians(self) -> dict[str, float]:
        labels = sorted({k for row in self.per_save for k in row})
        return {k: statistics.median(row.get(k, 0.0) for row in self.per_save) for k in labels}


def worker(steps: int, every: int, repeats: int, extra: list[str], out: str, breakdown: bool = False) -> None:
    from rexmoe_train import compat

    compat.install()
    import torch.distributed as dist

    from rexmoe_train.checkpoint import iter_name, layout
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.training.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    run_dir = os.environ["ASYNC_BENCH_DIR"]
    total_steps = 3 + repeats * len(MODES) * steps
    overrides = [*DEFAULTS, *extra, f"train.train_iters={total_steps}", f"run.dir={run_dir}"]
    trainer = Trainer(compose_experiment(overrides).experiment)
    ck = trainer.checkpoints
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint(blocking=True)  # untimed: megatron starts its writer machinery once
    barrier = dist.barrier  # the segments' own barriers are not the save's
    timers = Breakdown()
    if breakdown:
        timers.install(trainer)
    state_bytes = _dir_bytes(layout.save_root(trainer.cfg) / iter_name(trainer.step))
    segments = []
    for _ in range(repeats):
        for mode in MODES:
            barrier()
            first_save = len(ck.save_times)
            began = time.perf_counter()
            timers.active = mode == "async"
            for i in range(1, steps + 1):
                trainer.train_step()
                in_flight = ck.save_in_flight
                ck.finalize(blocking=False)
                if in_flight is not None and ck.save_in_flight is None:
                    timers.end_save()
                if mode != "none" and i % every == every // 2:
                    trainer.save_checkpoint(blocking=mode == "sync")
            in_flight = ck.save_in_flight
            ck.finalize(blocking=True)
            if in_flight is not None:
                timers.end_save()
            timers.active = False
            barrier()
            wall = time.perf_counter() - began
            saves = ck.save_times[first_save:]
            segments.append({"mode": mode, "wall_s": wall, "saves": len(saves),
                             "blocked_s": [b for _, b, _, _ in saves], "save_total_s": [t for _, _, t, _ in saves],
                             "polls_s": [q for *_, q in saves]})
    trainer.logger.close()
    if trainer.lock is not None:
        trainer.lock.release()
    per_rank = [None] * trainer.world_size
    dist.all_gather_object(per_rank, timers.medians() if breakdown else None)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": trainer.world_size, "state_bytes": state_bytes, "segments": segments,
                       "breakdown": per_rank if breakdown else None}, f)


def summarise(result: dict) -> dict:
    """Per mode: median blocked time per save, median extra wall time per save (against `none`)."""
    by = {m: [s for s in result["segments"] if s["mode"] == m] for m in MODES}
    base = statistics.median(s["wall_s"] for s in by["none"])
    row = {"world_size": result["world_size"], "state_mib": result["state_bytes"] / 2**20,
           "step_s": base / max(1, result.get("steps", 1))}
    for mode in ("sync", "async"):
        segs = by[mode]
        row[f"{mode}_blocked_s"] = statistics.median(b for s in segs for b in s["blocked_s"])
        row[f"{mode}_extra_s"] = statistics.median((s["wall_s"] - base) / s["saves"] for s in segs)
        row[f"{mode}_save_total_s"] = statistics.median(t for s in segs for t in s["save_total_s"])
        row[f"{mode}_polls_s"] = statistics.median(q for s in segs for q in s.get("polls_s", [0.0]))
    row["async_blocked_share"] = row["async_blocked_s"] / row["sync_blocked_s"]
    row["async_extra_share"] = row["async_extra_s"] / row["sync_extra_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    p.add_argument("--steps", type=int, default=12, help="steps per timed segment")
    p.add_argument("--every", type=int, default=4, help="steps between saves in a segment")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--breakdown", action="store_true", help="time each step of an async save, per rank")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the JSON file rank 0 writes
    args, extra = p.parse_known_args(argv)
    if args.worker:
        worker(args.steps, args.every, args.repeats, extra, args.worker, args.breakdown)
        return 0
    rows = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        tmp = tempfile.mkdtemp(prefix="async_save_bench_")
        try:
            result_file = os.path.join(tmp, "result.json")
            inner = [__file__, "--worker", result_file, "--steps", str(args.steps), "--every", str(args.every),
                     "--repeats", str(args.repeats), *(["--breakdown"] if args.breakdown else []), *extra]
            cmd = ([sys.executable, *inner] if nproc == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                    *inner])
            env = dict(os.environ, ASYNC_BENCH_DIR=os.path.join(tmp, "run"))
            env.setdefault("OMP_NUM_THREADS", "1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            with open(result_file) as f:
                result = json.load(f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result["steps"] = args.steps
        row = summarise(result)
        row["segments"] = result["segments"]
        rows.append(row)
        print(f"[async-save] {nproc} process(es): blocked per save sync {row['sync_blocked_s']:.3f} s, "
              f"async {row['async_blocked_s']:.3f} s", flush=True)
        if result.get("breakdown"):
            row["breakdown"] = result["breakdown"]
            for rank, medians in enumerate(result["breakdown"]):
                print(f"[async-save] rank {rank}, median s per async save: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()), flush=True)
    print("| processes | state MiB | s/step | blocked per save: sync / async (share) | async polls per save | "
          "extra wall per save: sync / async (share) | async save start to pointer |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['state_mib']:.0f} | {r['step_s']:.3f} | {r['sync_blocked_s']:.3f} / "
              f"{r['async_blocked_s']:.3f} s ({r['async_blocked_share']:.0%}) | {r['async_polls_s']:.3f} s | "
              f"{r['sync_extra_s']:.3f} / "
              f"{r['async_extra_s']:.3f} s ({r['async_extra_share']:.0%}) | {r['async_save_total_s']:.2f} s |")
    report = {"overrides": [*DEFAULTS, *extra], "steps": args.steps, "every": args.every, "rows": rows}
    print(json.dumps({k: v for k, v in report.items()} | {"rows": [{k: v for k, v in r.items() if k != "segments"}
                                                                    for r in rows]}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
