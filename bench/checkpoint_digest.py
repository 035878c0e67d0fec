"""What the checkpoint manifest's content digests add to a save and a load.

A scaled proxy of a checkpoint: ``--gib`` GiB of shard files of ``--shard-mib`` MiB each (random
bytes, as incompressible as trained weights), written and fsynced the way a save writes them. Then
the manifest code the trainer uses (rexmoe_train/checkpoint/layout.py: ``file_entries`` at save,
``verify_files`` at load; BLAKE3, one thread per file) is timed on the same files, page cache warm as
right after a save. The overhead is reported against the write time and extrapolated to a full
checkpoint of ``--full-gib`` GiB (the 2.3B model's torch_dist checkpoint: bf16 weights + fp32 main
weights + two fp32 Adam moments = 14 bytes per parameter, ~30 GiB).

  OMP_NUM_THREADS=1 python bench/checkpoint_digest.py --dir /tmp/ckbench --gib 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def write_shards(root: Path, gib: float, shard_mib: int) -> float:
    root.mkdir(parents=True)
    block = os.urandom(shard_mib << 20)
    n = max(1, int(gib * 1024 / shard_mib))
    start = time.perf_counter()
    for i in range(n):
        with open(root / f"__0_{i}.distcp", "wb") as f:
            f.write(block[:8] + i.to_bytes(8, "little") + block[16:])  # distinct files
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def main() -> None:
    from rexmoe_train.checkpoint import layout

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="scratch directory (removed afterwards)")
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--shard-mib", type=int, default=256)
    p.add_argument("--full-gib", type=float, default=2.3e9 * 14 / 2**30)
    args = p.parse_args()
    root = Path(args.dir) / "iter_0000001"
    if root.exists():
        raise SystemExit(f"{root} exists")
    try:
        write_s = write_shards(root, args.gib, args.shard_mib)
        size = sum(f.stat().st_size for f in root.iterdir())
        start = time.perf_counter()
        entries = layout.file_entries(root)
        hash_s = time.perf_counter() - start
        start = time.perf_counter()
        layout.verify_files(root, entries)
        verify_s = time.perf_counter() - start
    finally:
        shutil.rmtree(Path(args.dir), ignore_errors=True)
    gib = size / 2**30
    result = {
        "algorithm": layout.hash_name(), "files": len(entries), "gib": round(gib, 3),
        "cpus": os.cpu_count(), "write_fsync_s": round(write_s, 2), "write_gib_per_s": round(gib / write_s, 2),
        "digest_at_save_s": round(hash_s, 2), "digest_gib_per_s": round(gib / hash_s, 2),
        "verify_at_load_s": round(verify_s, 2),
        "save_overhead_pct": round(100 * hash_s / write_s, 1),
        "full_checkpoint_gib": round(args.full_gib, 1),
        "full_digest_s_estimate": round(args.full_gib / (gib / hash_s), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
