"""Peak memory of `rexmoe-convert export-hf` on REAL checkpoints of the paper's models (not a test).

  python bench/convert_memory.py run --work /tmp/convmem --layers 8 32 --json convmem.json

For each depth: build the model of configs/model/<--model> (default rexmoe_2.3b, vocabulary 32000 as
the paper's LLaMA-2 tokenizer) through our normal code path in ONE process on CPU, initialise it
(megatron's init) and save it with our model-only checkpoint save (checkpoint_io.save_model, the
torch_dist format training writes). Then run each conversion in a subprocess under
`/usr/bin/time -v` and record its peak RSS (Maximum resident set size, the process and its waited-for
children) against the checkpoint size:

  streamed  `rexmoe-convert export-hf [--compact]` (reads the checkpoint one layer at a time)
  built     the pre-streaming path: build the whole 1-process model, load the checkpoint into it,
            export its state dict (checkpoint_io.load_model + export_hf/export_compact)

Outputs and checkpoints are deleted after each depth (`--keep` keeps them). Sub-commands `make`,
`export-built` are the pieces `run` launches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def experiment(model: str, layers: int, vocab: int, bf16: bool):
    """The config `rexmoe-train model=<model>` composes, in a 1-process layout."""
    from rexmoe_train.config.compose import compose_experiment

    overrides = [f"model={model}", f"model.num_layers={layers}", f"model.vocab_size={vocab}",
                 "parallel.expert_model_parallel_size=1", "run.dir=/tmp/unused", f"train.bf16={str(bf16).lower()}"]
    return compose_experiment(overrides).experiment.validate()


def make(args) -> None:
    """Build + initialise + save (model only). Prints one JSON line."""
    from rexmoe_train.convert import checkpoint_io

    cfg = checkpoint_io.single_process(experiment(args.model, args.layers, args.vocab, args.bf16), bf16=args.bf16)
    t0 = time.time()
    model = checkpoint_io.build_single_process(cfg, args.vocab)
    params = sum(p.numel() for p in model.chunks[0].parameters())
    t1 = time.time()
    out = checkpoint_io.save_model(cfg, model, args.vocab, Path(args.out), step=1, source="bench/convert_memory.py",
                                   overwrite=True)
    print(json.dumps({"params": params, "build_s": round(t1 - t0, 1), "save_s": round(time.time() - t1, 1),
                      "checkpoint": str(out)}), flush=True)


def export_built(args) -> None:
    """The pre-streaming export: whole model in memory, then the (per-layer) writer."""
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.export import export_compact, export_hf

    cfg, model, meta = checkpoint_io.load_model(Path(args.checkpoint), bf16=args.dtype == "bf16")
    state = model.chunks[0].state_dict()
    vocab = int(meta["model"]["model.vocab_size"])
    if args.compact:
        export_compact(cfg, state, vocab, Path(args.out), overwrite=True, progress=False)
    else:
        export_hf(cfg, state, model.vocab_size, Path(args.out), tokenizer_vocab_size=vocab, overwrite=True,
                  progress=False)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: peak RSS (KiB -> bytes), wall seconds, exit status."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "stdout": proc.stdout.strip()[-500:]}


def run(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []
    for layers in args.layers:
        ckpt = work / f"ckpt-{args.model}-L{layers}"
        made = timed([py, str(Path(__file__).resolve()), "make", "--model", args.model, "--layers", str(layers),
                      "--vocab", str(args.vocab), "--out", str(ckpt)] + (["--bf16"] if args.bf16 else []))
        if made["rc"] != 0:
            raise SystemExit(f"make L{layers} failed")
        info = json.loads(made["stdout"].splitlines()[-1])
        ckpt_bytes = _size(ckpt)
        print(f"[L{layers}] {info['params']:,} params, checkpoint {ckpt_bytes / 2**30:.2f} GiB, "
              f"made in {made['wall_s']} s (peak RSS {made['peak_rss_bytes'] / 2**30:.2f} GiB)", flush=True)
        for spec in args.conversions:
            mode, _, fmt = spec.partition(":")
            out = work / f"out-L{layers}-{mode}-{fmt}"
            extra = (["--compact"] if fmt == "compact" else []) + ["--dtype", args.dtype]
            if mode == "streamed":
                cmd = [py, "-m", "rexmoe_train.cli.convert", "export-hf", str(ckpt), str(out), "--overwrite",
                       "--quiet", *extra]
            else:
                cmd = [py, str(Path(__file__).resolve()), "export-built", str(ckpt), str(out), *extra]
            res = timed(cmd)
            row = {"model": args.model, "layers": layers, "params": info["params"], "conversion": mode,
                   "format": fmt, "dtype": args.dtype, "checkpoint_bytes": ckpt_bytes,
                   "output_bytes": _size(out) if out.exists() else None, **res}
            rows.append(row)
            print(f"[L{layers}] {mode:8s} {fmt:8s} rc={res['rc']} peak RSS "
                  f"{(res['peak_rss_bytes'] or 0) / 2**30:.2f} GiB, {res['wall_s']} s, output "
                  f"{(row['output_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    print("\n| model | layers | params | checkpoint | conversion | format | dtype | output | peak RSS | "
          "peak RSS / checkpoint | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = r["peak_rss_bytes"] or 0
        print(f"| {r['model']} | {r['layers']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_bytes'] / 2**30:.2f} GiB | "
              f"{r['conversion']} | {r['format']} | {r['dtype']} | {(r['output_bytes'] or 0) / 2**30:.2f} GiB | "
              f"{rss / 2**30:.2f} GiB | {rss / r['checkpoint_bytes']:.2f} | {r['wall_s']} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", default="rexmoe_2.3b")
    m.add_argument("--layers", type=int, default=32)
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--bf16", action="store_true", help="bf16 parameters (half the checkpoint)")
    m.add_argument("--out", required=True)
    m.set_defaults(run=make)
    b = sub.add_parser("export-built")
    b.add_argument("checkpoint")
    b.add_argument("out")
    b.add_argument("--compact", action="store_true")
    b.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    b.set_defaults(run=export_built)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True, help="scratch folder for checkpoints and exports (use /tmp)")
    r.add_argument("--model", default="rexmoe_2.3b")
    r.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    r.add_argument("--vocab", type=int, default=32000)
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="export dtype")
    r.add_argument("--conversions", nargs="+", default=["streamed:compact", "streamed:unrolled"],
                   help="MODE:FORMAT with MODE streamed|built, FORMAT compact|unrolled")
    r.add_argument("--keep", action="store_true")
    r.add_argument("--json")
    r.set_defaults(run=run)
    args = p.parse_args()
    if args.command != "run":
        import warnings

        warnings.filterwarnings("ignore")
    args.run(args)


if __name__ == "__main__":
    main()
