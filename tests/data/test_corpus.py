"""Stdlib corpus gathering, fingerprint and the deterministic document split."""

import hashlib
import sysconfig
from pathlib import Path

import pytest

from rexmoe_train.data import (
    EXCLUDED_DIRS,
    CorpusDocument,
    corpus_fingerprint,
    gather_stdlib_corpus,
    split_documents,
)

SMALL = 300_000


def test_gather_is_deterministic():
    a = gather_stdlib_corpus(max_bytes=SMALL)
    b = gather_stdlib_corpus(max_bytes=SMALL)
    assert a == b
    assert corpus_fingerprint(a) == corpus_fingerprint(b)
    assert len(corpus_fingerprint(a)) == 16
    int(corpus_fingerprint(a), 16)  # hex


def test_fingerprint_sensitive_to_names_and_contents():
    docs = [CorpusDocument("a.py", b"x = 1\n"), CorpusDocument("b.py", b"y = 2\n")]
    fp = corpus_fingerprint(docs)
    assert corpus_fingerprint([CorpusDocument("a.py", b"x = 1\n"), CorpusDocument("c.py", b"y = 2\n")]) != fp
    assert corpus_fingerprint([CorpusDocument("a.py", b"x = 1\n"), CorpusDocument("b.py", b"y = 3\n")]) != fp
    assert corpus_fingerprint(docs[::-1]) != fp
    # Moving bytes between name and text must not collide.
    assert corpus_fingerprint([CorpusDocument("ab", b"c")]) != corpus_fingerprint([CorpusDocument("a", b"bc")])


def test_full_corpus_contents():
    docs = gather_stdlib_corpus()
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert len(docs) > 100
    assert sum(len(d.text) for d in docs) > 1_000_000
    for name in names:
        assert name.endswith(".py")
        assert "\\" not in name and not name.startswith("/")
        # No component of the path is an excluded directory.
        assert not set(name.split("/")[:-1]) & EXCLUDED_DIRS, name
    # Real files of the running interpreter.
    assert "os.py" in names and "json/__init__.py" in names
    root = Path(sysconfig.get_paths()["stdlib"])
    by_name = {d.name: d for d in docs}
    assert by_name["os.py"].text == (root / "os.py").read_bytes()
    assert all(d.text for d in docs)  # empty files skipped


def test_max_bytes_is_honoured_and_a_prefix():
    full = gather_stdlib_corpus()
    small = gather_stdlib_corpus(max_bytes=SMALL)
    total = sum(len(d.text) for d in small)
    # Whole documents until the limit is reached: the last one crosses it.
    assert total >= SMALL
    assert total - len(small[-1].text) < SMALL
    assert small == full[: len(small)]
    assert gather_stdlib_corpus(max_bytes=1)[:1] == full[:1] and len(gather_stdlib_corpus(max_bytes=1)) == 1
    with pytest.raises(ValueError):
        gather_stdlib_corpus(max_bytes=0)


def test_split_disjoint_covering_non_empty():
    docs = gather_stdlib_corpus(max_bytes=SMALL)
    for vf in (0.02, 0.3, 0.9):
        train, valid = split_documents(docs, valid_fraction=vf, seed=0)
        assert train and valid
        assert not {d.name for d in train} & {d.name for d in valid}
        assert sorted(d.name for d in train + valid) == [d.name for d in docs]
        # Input order is preserved within each side.
        assert [d.name for d in train] == sorted(d.name for d in train)
    assert split_documents(docs, 0.3, 0) == split_documents(docs, 0.3, 0)


def test_split_fraction_roughly_respected():
    docs = gather_stdlib_corpus()
    _, valid = split_documents(docs, valid_fraction=0.2, seed=7)
    assert 0.1 < len(valid) / len(docs) < 0.3


def test_split_stable_when_max_bytes_changes():
    # A document's side depends only on (seed, name): growing the corpus must
    # not move any document (it would leak validation text into training).
    full_train, full_valid = split_documents(gather_stdlib_corpus(), 0.3, seed=0)
    full_side = {d.name: "t" for d in full_train} | {d.name: "v" for d in full_valid}
    for mb in (600_000, 2_000_000):
        train, valid = split_documents(gather_stdlib_corpus(max_bytes=mb), 0.3, seed=0)
        assert all(full_side[d.name] == "t" for d in train)
        assert all(full_side[d.name] == "v" for d in valid)


def test_split_independent_of_order_and_depends_on_seed():
    docs = gather_stdlib_corpus(max_bytes=2_000_000)
    t1, v1 = split_documents(docs, 0.3, seed=0)
    t2, v2 = split_documents(docs[::-1], 0.3, seed=0)
    assert {d.name for d in v1} == {d.name for d in v2}
    _, v3 = split_documents(docs, 0.3, seed=1)
    assert {d.name for d in v1} != {d.name for d in v3}


def _full_hash(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest(), 16)


def test_split_rebalances_degenerate_sides():
    docs = [CorpusDocument(f"m{i}.py", b"pass\n") for i in range(6)]
    lowest = min(docs, key=lambda d: _full_hash(3, d.name))
    # Threshold below every bucket except 0 -> validation (almost surely) empty.
    train, valid = split_documents(docs, valid_fraction=1e-9, seed=3)
    assert [d.name for d in valid] == [lowest.name]
    assert len(train) == 5
    # Threshold above every bucket -> training empty; lowest-hash doc moves back.
    train, valid = split_documents(docs, valid_fraction=0.999999, seed=3)
    assert [d.name for d in train] == [lowest.name]
    assert len(valid) == 5
    # No validation requested: nothing moves.
    train, valid = split_documents(docs, valid_fraction=0.0, seed=3)
    assert len(train) == 6 and valid == []
    with pytest.raises(ValueError):
        split_documents(docs, valid_fraction=1.0, seed=3)
