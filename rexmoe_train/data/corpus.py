"""The embedded corpus: the running interpreter's own standard-library sources.

WHY: a pretraining framework needs real (non-random) text for smoke runs, loss
curves and CI, yet many machines it runs on cannot download anything. Every
Python installation ships a few MB of ordinary, human-written code in its
stdlib, so that is the corpus. It differs between Python versions (and distro
patches), which is why runs record :func:`corpus_fingerprint`.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CorpusDocument",
    "EXCLUDED_DIRS",
    "gather_stdlib_corpus",
    "corpus_fingerprint",
    "split_documents",
]

# Directories never entered. Third-party packages are not "the stdlib" and vary
# per machine; test suites are huge, repetitive fixture code (and contain files
# with deliberately odd encodings); lib2to3 is mostly Python 2 grammar/fixers.
EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}
)

# Resolution of the split hash: a fraction is honoured to 1e-4.
_SPLIT_BUCKETS = 10_000


@dataclass(frozen=True)
class CorpusDocument:
    """One source file: ``name`` is its path relative to the stdlib root with
    '/' separators (stable across OSes, used for hashing); ``text`` its bytes."""

    name: str
    text: bytes


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_py_files(root: Path) -> list[str]:
    """Relative '/'-separated paths of all eligible ``*.py`` files, sorted.

    WHY sort the final relative paths (not rely on walk order): os.walk order is
    filesystem dependent; sorting makes the document order, and therefore
    ``max_bytes`` truncation, identical on every machine with the same stdlib.
    """
    rel_paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so excluded trees are never walked.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for fname in filenames:
            if fname.endswith(".py"):
                rel_paths.append((rel_dir / fname).as_posix())
    rel_paths.sort()
    return rel_paths


def gather_stdlib_corpus(max_bytes: int | None = None) -> list[CorpusDocument]:
    """Read the stdlib ``*.py`` sources in sorted path order.

    Empty files (e.g. bare ``__init__.py``) and non-regular files (broken
    symlinks) are skipped. With ``max_bytes``, documents are appended whole
    until the running total reaches ``max_bytes``; the document that crosses
    the limit is kept, so the result is never empty and exceeds the limit by
    less than one document. The result is a prefix of the ``max_bytes=None``
    corpus.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    root = _stdlib_root()
    docs: list[CorpusDocument] = []
    total = 0
    for rel in _stdlib_py_files(root):
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_bytes()
        if not text:
            continue
        docs.append(CorpusDocument(name=rel, text=text))
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return docs


def corpus_fingerprint(docs: Sequence[CorpusDocument]) -> str:
    """First 16 hex chars of a sha256 over all names and contents, in order.

    Each field is length-prefixed so different (name, text) splits of the same
    byte stream cannot collide.
    """
    h = hashlib.sha256()
    for doc in docs:
        name = doc.name.encode("utf-8")
        h.update(len(name).to_bytes(8, "little"))
        h.update(name)
        h.update(len(doc.text).to_bytes(8, "little"))
        h.update(doc.text)
    return h.hexdigest()[:16]


def _split_hash(seed: int, name: str) -> int:
    """Stable 256-bit hash of a document name (never Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest(), "big")


def split_documents(
    docs: Sequence[CorpusDocument], valid_fraction: float, seed: int
) -> tuple[list[CorpusDocument], list[CorpusDocument]]:
    """Deterministic train/validation split by document name.

    A document goes to validation iff
    ``sha256(f"{seed}:{name}") mod 10_000 < valid_fraction * 10_000``.
    WHY per-name hashing: a document's side depends only on (seed, name), not on
    document order or on which other documents exist, so changing ``max_bytes``
    (or the Python version adding files) never leaks a validation document into
    training.

    Rebalancing rule (only when ``len(docs) >= 2`` and ``0 < valid_fraction < 1``
    and one side would otherwise be empty -- i.e. tiny corpora): if validation
    is empty, the training document with the lowest full sha256 value moves to
    validation; if training is empty, the validation document with the lowest
    full sha256 value moves to training. Exactly one document moves, and only
    in this degenerate case can a document's side depend on the other documents.

    Both returned lists keep the input order. ``valid_fraction`` must lie in
    [0, 1); 0 means no validation set.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    threshold = valid_fraction * _SPLIT_BUCKETS
    hashes = [_split_hash(seed, d.name) for d in docs]
    is_valid = [h % _SPLIT_BUCKETS < threshold for h in hashes]

    if len(docs) >= 2 and valid_fraction > 0.0:
        n_valid = sum(is_valid)
        if n_valid in (0, len(docs)):
            # Move the lowest-hash doc of the full side (ties broken by name).
            i = min(range(len(docs)), key=lambda k: (hashes[k], docs[k].name))
            is_valid[i] = not is_valid[i]

    train = [d for d, v in zip(docs, is_valid) if not v]
    valid = [d for d, v in zip(docs, is_valid) if v]
    return train, valid
