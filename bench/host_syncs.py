"""Host syncs per MoE layer per step, ours vs stock megatron-core (not a test; CPU only).

Runs tests/devicecheck/host_syncs.py under the strict-device harness (CPU data, accelerator
discipline) and counts, by call site, every device -> host read and host -> device copy of one MoE
layer over a step of 2 micro-batches (forward + backward each, a fresh PSR mask), for our layer (r = 4:
``alltoall`` and ``rexmoe_dedup``; r = 1) and stock megatron-core's MoELayer at the same shape, plus a
whole training step of our tiny model (4 MoE layers, 1 micro-batch).

    python bench/host_syncs.py [--ep 1 2] [--out host_syncs.json]

ep = 2 runs 2 processes under torchrun (gloo). Prints the JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(ep: int, out_dir: str) -> dict:
    out = os.path.join(out_dir, f"ep{ep}.json")
    runner = ["-m", "tests.devicecheck.host_syncs", out, str(ep)]
    cmd = [sys.executable, *runner] if ep == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ep), *runner]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True)
    if proc.returncode or not os.path.exists(out):
        sys.exit(f"host_syncs: ep={ep} failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def table(runs: list[dict]) -> str:
    lines = ["| layer (per MoE layer, step of 2 micro-batches) | d2h | h2d | sync |", "|---|---:|---:|---:|"]
    sites = []
    for run in runs:
        for name, result in run["results"].items():
            layer = result["layer"]
            lines.append(f"| {name} | {layer['d2h']} | {layer['h2d']} | {layer['sync']} |")
            for kind in ("d2h", "h2d", "sync"):
                for site, n in layer["sites"][kind].items():
                    sites.append(f"| {name} | {kind} | {site} | {n} |")
    lines += ["", "| whole training step, ours (4 MoE layers, 1 micro-batch) | d2h | h2d | sync |",
              "|---|---:|---:|---:|"]
    for run in runs:
        for name, result in run["results"].items():
            if "train_step" in result:
                step = result["train_step"]
                lines.append(f"| {name} | {step['d2h']} | {step['h2d']} | {step['sync']} |")
    return "\n".join(lines + ["", "| layer | kind | call site | count |", "|---|---|---|---:|"] + sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2], help="expert-parallel sizes (1, 2)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(ep, tmp) for ep in args.ep]
    text = json.dumps(runs, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    print(table(runs))


if __name__ == "__main__":
    main()
