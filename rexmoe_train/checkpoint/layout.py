"""Where a checkpoint's files live, the manifest that describes them, and durable small writes.

Layout (as Megatron-LM)::

    <save>/latest_checkpointed_iteration.txt     the step of the newest complete checkpoint
    <save>/iter_0000100/                         megatron dist_checkpointing, torch_dist backend
        __*.distcp, .metadata, metadata.json, common.pt     (written by dist_checkpointing)
        rexmoe_checkpoint.json                   the manifest: model shape, parallel layout, files
        config.yaml                              the resolved config of the run that saved it

A save writes ``iter_0000100.tmp`` and renames it once complete (manager.py); the pointer is replaced
atomically (temp file + fsync + ``os.replace`` + fsync). Torch-only: the converters and ``rexmoe-eval``
read checkpoints through this module without megatron.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from rexmoe_train.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
META = "rexmoe_checkpoint.json"  # the manifest
CONFIG = "config.yaml"
FORMAT_VERSION = 1


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def save_root(cfg) -> Path:
    return Path(cfg.checkpoint.save or os.path.join(cfg.run.dir, "checkpoints"))


# --------------------------------------------------------------------------------------------------
# durable small writes
# --------------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def replace_pointer(root: Path, step: int, before_replace=None) -> None:
    """Point ``<root>/latest_checkpointed_iteration.txt`` at ``step``, atomically and durably."""
    pointer_tmp = root / (TRACKER + ".tmp")
    write_durable(pointer_tmp, f"{step}\n")
    if before_replace is not None:
        before_replace()
    os.replace(pointer_tmp, root / TRACKER)
    fsync_path(root)


def file_sizes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == META:
                continue
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


# --------------------------------------------------------------------------------------------------
# finding a checkpoint and reading its manifest
# --------------------------------------------------------------------------------------------------
def read_tracker(root: Path) -> int:
    path = root / TRACKER
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise CheckpointError(f"checkpoint error: cannot read {path}: {err.strerror}") from None
    if not text.isdigit():
        raise CheckpointError(f"checkpoint error: {path} must hold a step number, found {text[:40]!r}")
    return int(text)


def locate(cfg) -> Optional[Path]:
    """The iter dir to resume from, or None for a fresh start. Raises CheckpointError."""
    ck = cfg.checkpoint
    if ck.load is None:
        root = save_root(cfg)
        if not (root / TRACKER).exists():
            return None
        return root / iter_name(read_tracker(root))
    path = Path(ck.load)
    if not path.exists():
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: not a directory")
    if (path / TRACKER).exists():
        return path / iter_name(read_tracker(path))
    if (path / META).exists():
        return path
    raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: neither a checkpoint "
                          f"directory ({TRACKER}) nor an iter_* directory ({META})")


def read_metadata(ckpt: Path) -> dict:
    """Parse and check the manifest and that every file it lists is there, whole."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint error: {ckpt} does not exist (the pointer names a missing "
                              "checkpoint)")
    path = ckpt / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {META} is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint error: {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint error: {path}: unknown format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT_VERSION}")
    for key in ("step", "model", "parallel", "files"):
        if key not in meta:
            raise CheckpointError(f"checkpoint error: {path}: field {key!r} is missing")
    if not isinstance(meta["step"], int) or meta["step"] < 1:
        raise CheckpointError(f"checkpoint error: {path}: step must be a positive integer, "
                              f"found {meta['step']!r}")
    for name, size in sorted(meta["files"].items()):
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint error: {ckpt} is damaged: {name} has "
                                  f"{p.stat().st_size} bytes, expected {size} (truncated?)")
    return meta


def write_manifest(ckpt: Path, meta: dict) -> None:
    """Add the file list to ``meta`` and write it durably (the last file of a checkpoint)."""
    meta["files"] = file_sizes(ckpt)
    write_durable(ckpt / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# housekeeping
# --------------------------------------------------------------------------------------------------
def remove_stale_tmp(root: Path) -> None:
    """``iter_*.tmp`` dirs are left by a save that was killed: never a checkpoint, always safe to drop."""
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def prune(root: Path, step: int, keep_last_n: Optional[int], after_first=None) -> None:
    """Remove the oldest iter_* dirs before ``step`` so that keep_last_n remain (the new one
    included). Dirs of later steps (an abandoned timeline) are left alone."""
    if keep_last_n is None:
        return
    older = []
    for d in root.glob("iter_*"):
        suffix = d.name[len("iter_"):]
        if d.is_dir() and suffix.isdigit() and int(suffix) < step:
            older.append((int(suffix), d))
    older.sort()
    doomed = older[: max(0, len(older) - (keep_last_n - 1))]
    for i, (_, d) in enumerate(doomed):
        shutil.rmtree(d, ignore_errors=True)
        if i == 0 and after_first is not None:
            after_first()
