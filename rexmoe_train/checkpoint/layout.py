"""Where a checkpoint's files live, the manifest that describes them, and durable small writes.

Layout (as Megatron-LM)::

    <save>/latest_checkpointed_iteration.txt     the step of the newest complete checkpoint
    <save>/iter_0000100/                         megatron dist_checkpointing, torch_dist backend
        __*.distcp, .metadata, metadata.json, common.pt     (written by dist_checkpointing)
        rexmoe_checkpoint.json                   the manifest: model shape, parallel layout, files
        config.yaml                              the resolved config of the run that saved it

A save writes ``iter_0000100.tmp`` and renames it once complete (manager.py); the pointer is replaced
atomically (temp file + fsync + ``os.replace`` + fsync). Torch-free: the converters and ``rexmoe-eval``
read checkpoints through this module without megatron.

Integrity and trust (docs/reliability.md). The manifest lists every file with its size and a BLAKE3
digest of its content; :func:`read_metadata` re-hashes every file and compares BEFORE anything of the
checkpoint is unpickled or read into tensors (torch_dist's ``.metadata`` and ``common.pt`` are pickles).
BLAKE3 rather than crc32c/xxh3 because the digests are also what a signature binds: with a
non-cryptographic checksum a crafted ``.metadata`` could be given the checksum of the signed one.
With ``REXMOE_CHECKPOINT_KEY`` set, the manifest is signed at save (HMAC-SHA256 over its canonical
JSON) and a load refuses a checkpoint whose manifest is unsigned or signed with another key.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from rexmoe_train.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
META = "rexmoe_checkpoint.json"  # the manifest
CONFIG = "config.yaml"
FORMAT_VERSION = 2  # 2: files map to {"size", "<hash>"}; 1 (sizes only) still loads without a key
FORMATS = (1, 2)
KEY_ENV = "REXMOE_CHECKPOINT_KEY"
LOCK = "rexmoe.lock"  # in run.dir: held by rank 0 for a whole run (training/run_lock.py)
_STEP = re.compile(r"[0-9]+")


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
# content digests and signatures
# --------------------------------------------------------------------------------------------------
def hash_name() -> str:
    """BLAKE3 when the package is there (a dependency); hashlib's sha256 otherwise (slower, same
    guarantees). The manifest records which one it used."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return "sha256"
    return "blake3"


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "blake3":
        import blake3

        # update_mmap: no copy through Python buffers; one thread per file (files hash in parallel)
        return blake3.blake3().update_mmap(str(path)).hexdigest()
    if algorithm == "sha256":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        return h.hexdigest()
    raise CheckpointError(f"checkpoint error: {path}: unknown digest {algorithm!r} in {META} "
                          "(known: blake3, sha256)")


def _parallel(fn, items: list):
    """Hash several files at once: both hash functions release the GIL on large buffers."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(8, len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def file_entries(root: Path, algorithm: Optional[str] = None, known: Optional[dict] = None) -> dict[str, dict]:
    """Every file under ``root`` but the manifest: {relative path: {"size": bytes, algorithm: hex}}.
    ``known``: entries already computed by the process that wrote those files (each rank hashes its
    own shards right after writing them); used when the size and algorithm agree, else re-hashed."""
    algorithm = algorithm or hash_name()
    known = known or {}
    sizes = file_sizes(root)
    reused = {n: e for n, e in known.items()
              if n in sizes and e.get("size") == sizes[n] and set(e) == {"size", algorithm}}
    names = sorted(set(sizes) - set(reused))
    digests = _parallel(lambda n: file_digest(root / n, algorithm), names)
    entries = reused | {n: {"size": sizes[n], algorithm: d} for n, d in zip(names, digests)}
    return dict(sorted(entries.items()))


def signing_key() -> Optional[bytes]:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def _canonical(meta: dict) -> bytes:
    unsigned = {k: v for k, v in meta.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def signature(meta: dict, key: bytes) -> str:
    return hmac.new(key, _canonical(meta), hashlib.sha256).hexdigest()


def manifest_digest(ckpt: Path) -> Optional[str]:
    """sha256 of the manifest's bytes: it names every file's digest, so equal digests (with the files
    verified) mean the same checkpoint. None when there is no readable manifest."""
    try:
        return hashlib.sha256((ckpt / META).read_bytes()).hexdigest()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# finding a checkpoint and reading its manifest
# --------------------------------------------------------------------------------------------------
def why_not_a_dir(path: Path) -> Optional[str]:
    """Why ``path`` cannot be used as a directory, in words (None when it is one, or is simply
    absent with a creatable name): a symlink loop, a dangling symlink, or an existing non-directory.
    Path.exists() is False for the first two, so a mkdir would report them as 'File exists'."""
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop (it never reaches a directory)"
        if os.path.islink(path):
            return f"is a symlink to {os.readlink(path)}, which does not exist"
        if err.errno == errno.ENOTDIR:
            return "lies below a file, not a directory"
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "exists and is not a directory"
    return None


def read_tracker(root: Path) -> int:
    path = root / TRACKER
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint error: cannot read {path}: {err.strerror} (errno {err.errno})") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    # ASCII digits only: str.isdigit() also accepts e.g. superscripts, which int() rejects
    if text is None or not _STEP.fullmatch(text):
        raise CheckpointError(f"checkpoint error: {path} must hold a step number (ASCII digits), found "
                              f"{raw[:40]!r}")
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
    problem = why_not_a_dir(path)
    if problem:
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r} {problem}")
    if not path.exists():
        raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: no such directory")
    if (path / TRACKER).exists():
        return path / iter_name(read_tracker(path))
    if (path / META).exists():
        return path
    raise CheckpointError(f"checkpoint error: checkpoint.load={ck.load!r}: neither a checkpoint "
                          f"directory ({TRACKER}) nor an iter_* directory ({META})")


def read_metadata(ckpt: Path, verify: bool = True) -> dict:
    """Parse and check the manifest, its signature (when ``REXMOE_CHECKPOINT_KEY`` is set) and every
    file it lists: there, whole, and (``verify``) with the recorded content digest. The only reads
    before this returns are the manifest (JSON) and the files' raw bytes: nothing is unpickled."""
    if not ckpt.is_dir():
        problem = why_not_a_dir(ckpt) or "does not exist"
        raise CheckpointError(f"checkpoint error: {ckpt} {problem} (the pointer "
                              f"{ckpt.parent / TRACKER} names it as the newest checkpoint)")
    path = ckpt / META
    try:
        raw = path.read_bytes()
        meta = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {META} is missing") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint error: cannot read {path}: {err.strerror} (errno {err.errno})") from None
    except ValueError as err:  # JSON and UTF-8 decoding errors
        raise CheckpointError(f"checkpoint error: {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(f"checkpoint error: {path}: unknown format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected one of {', '.join(map(str, FORMATS))}")
    check_signature(path, meta)
    for key in ("step", "model", "parallel", "files"):
        if key not in meta:
            raise CheckpointError(f"checkpoint error: {path}: field {key!r} is missing")
    if not isinstance(meta["step"], int) or meta["step"] < 1:
        raise CheckpointError(f"checkpoint error: {path}: step must be a positive integer, "
                              f"found {meta['step']!r}")
    if not isinstance(meta["files"], dict) or not meta["files"]:
        raise CheckpointError(f"checkpoint error: {path}: field 'files' must list the checkpoint's files")
    entries = {}
    for name, entry in sorted(meta["files"].items()):
        size = entry if meta["format"] == 1 else (entry.get("size") if isinstance(entry, dict) else None)
        if not isinstance(size, int) or (meta["format"] != 1 and len(entry) != 2):
            raise CheckpointError(f"checkpoint error: {path}: files[{name!r}] must be "
                                  + ("a size" if meta["format"] == 1 else '{"size": N, "<digest>": HEX}'))
        p = ckpt / name
        # names come from the manifest: a signed one is trusted, an unsigned one must stay inside
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint error: {path}: file name {name!r} leaves the checkpoint")
        if not p.is_file():
            raise CheckpointError(f"checkpoint error: {ckpt} is incomplete: {name} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(f"checkpoint error: {ckpt} is damaged: {name} has "
                                  f"{p.stat().st_size} bytes, expected {size} (truncated?)")
        entries[name] = entry
    # files the manifest does not name would still be read by torch (e.g. a planted .metadata)
    extra = sorted(set(file_sizes(ckpt)) - set(entries))
    if extra and meta["format"] != 1:
        raise CheckpointError(f"checkpoint error: {ckpt}: {extra[0]} is not listed in {META} "
                              "(added after the save?)")
    if verify and meta["format"] != 1:
        verify_files(ckpt, entries)
    meta["_digest"] = hashlib.sha256(raw).hexdigest()  # in memory only: which manifest was read
    return meta


def check_signature(path: Path, meta: dict) -> None:
    key = signing_key()
    if key is None:
        return
    sig = meta.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "hmac-sha256" or not isinstance(sig.get("value"), str):
        raise CheckpointError(f"checkpoint error: {path} is not signed and {KEY_ENV} is set: refusing "
                              "to load a checkpoint of unknown origin (torch_dist files are pickles)")
    if not hmac.compare_digest(sig["value"], signature(meta, key)):
        raise CheckpointError(f"checkpoint error: {path}: signature does not match {KEY_ENV} (signed "
                              "with another key, or changed after signing): refusing to load it")


def verify_files(ckpt: Path, entries: dict) -> None:
    """Re-hash every listed file and compare: the first mismatch (in name order) is the error."""
    def check(name: str) -> Optional[str]:
        entry = entries[name]
        algorithm = next(k for k in entry if k != "size")
        try:
            got = file_digest(ckpt / name, algorithm)
        except OSError as err:
            return f"checkpoint error: cannot read {ckpt / name}: {err.strerror} (errno {err.errno})"
        if got != entry[algorithm]:
            return (f"checkpoint error: {ckpt} is damaged: {name} does not match its {algorithm} digest "
                    f"in {META} (content changed after the save)")
        return None

    names = sorted(entries)
    for problem in _parallel(check, names):
        if problem:
            raise CheckpointError(problem)


def write_manifest(ckpt: Path, meta: dict, known: Optional[dict] = None) -> None:
    """Add the file list with content digests to ``meta`` (``known``: see :func:`file_entries`), sign
    it when ``REXMOE_CHECKPOINT_KEY`` is set, and write it durably (the last file of a checkpoint)."""
    meta["format"] = FORMAT_VERSION
    meta["files"] = file_entries(ckpt, known=known)
    meta.pop("signature", None)
    key = signing_key()
    if key is not None:
        meta["signature"] = {"alg": "hmac-sha256", "value": signature(meta, key)}
    write_durable(ckpt / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# housekeeping
# --------------------------------------------------------------------------------------------------
def remove_stale_tmp(root: Path) -> None:
    """``iter_*.tmp`` dirs are left by a save that was killed: never a checkpoint, always safe to drop."""
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        (root / (TRACKER + ".tmp")).unlink()
    except FileNotFoundError:
        pass


def prune(root: Path, step: int, keep_last_n: Optional[int], after_first=None) -> None:
    """Remove the oldest checkpoints before ``step`` so that keep_last_n remain (the new one
    included). Only what this project wrote is touched: an ``iter_*`` dir counts as a checkpoint only
    when it is a real directory holding a readable manifest, and only the files that manifest lists
    are removed (a file put there since stays, with its directory). Dirs of later steps (an
    abandoned timeline) are left alone."""
    if keep_last_n is None:
        return
    older = []
    for d in root.glob("iter_*"):
        suffix = d.name[len("iter_"):]
        if suffix.isdigit() and int(suffix) < step and not d.is_symlink() and d.is_dir():
            listed = _listed_files(d)
            if listed is not None:
                older.append((int(suffix), d, listed))
    older.sort()
    doomed = older[: max(0, len(older) - (keep_last_n - 1))]
    for i, (_, d, listed) in enumerate(doomed):
        _remove_listed(d, listed)
        if i == 0 and after_first is not None:
            after_first()


def _listed_files(ckpt: Path) -> Optional[list[str]]:
    """The files a checkpoint's manifest lists (the manifest last), or None without a usable one."""
    try:
        meta = json.loads((ckpt / META).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return None
    names = [n for n in files if isinstance(n, str) and not os.path.isabs(n) and ".." not in Path(n).parts]
    return names + [META]


def _remove_listed(ckpt: Path, names: list[str]) -> None:
    for name in names:
        try:
            (ckpt / name).unlink()
        except OSError:  # already gone, or not a file: whatever it is, it is not removed
            pass
    for dirpath, _, _ in os.walk(ckpt, topdown=False):  # deepest first
        try:
            os.rmdir(dirpath)  # only empty ones: anything left is not the project's
        except OSError:
            pass
