"""Token windows, deterministic (seed, step) batches, validation batches."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from rexmoe_train.data import (
    ByteTokenizer,
    CorpusDocument,
    GlobalBatchSampler,
    TokenWindowDataset,
    build_embedded_datasets,
    gather_stdlib_corpus,
    micro_batches,
    valid_batches,
)

SEQ = 32


@pytest.fixture(scope="module")
def dataset() -> TokenWindowDataset:
    return TokenWindowDataset(gather_stdlib_corpus(max_bytes=300_000), ByteTokenizer(), SEQ)


def _rows(batches):
    """All sample rows (tokens + last label, i.e. the full window) as a multiset."""
    rows = Counter()
    for mb in batches:
        full = torch.cat([mb["tokens"], mb["labels"][:, -1:]], dim=1)
        rows.update(tuple(r) for r in full.tolist())
    return rows


def test_concatenation_and_windows():
    docs = [CorpusDocument("a.py", "x = 'é'\n".encode()), CorpusDocument("b.py", b"def f():\n    pass\n" * 3)]
    tok = ByteTokenizer()
    ds = TokenWindowDataset(docs, tok, seq_length=8)
    raw = []
    for d in docs:
        raw += list(d.text) + [tok.eod]
    assert ds.tokens.dtype == np.uint16
    assert ds.tokens.tolist() == raw
    assert ds.num_tokens == len(raw)
    assert len(ds) == (len(raw) - 1) // 8
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].dtype == torch.long and s["tokens"].shape == (8,)
        assert s["tokens"].tolist() == raw[i * 8 : i * 8 + 8]
        assert s["labels"].tolist() == raw[i * 8 + 1 : i * 8 + 9]
        assert s["loss_mask"].dtype == torch.float32 and torch.equal(s["loss_mask"], torch.ones(8))
        assert s["position_ids"].tolist() == list(range(8))
    with pytest.raises(IndexError):
        ds[len(ds)]
    # Every token except the very last is an input exactly once (no waste, no overlap).
    assert len(ds) * 8 > len(raw) - 1 - 8


def test_too_small_dataset_raises():
    with pytest.raises(ValueError, match="seq_length"):
        TokenWindowDataset([CorpusDocument("a.py", b"abc")], ByteTokenizer(), seq_length=16)


def test_micro_batch_shapes_and_labels(dataset):
    mbs = micro_batches(dataset, seed=1, global_batch_size=16, micro_batch_size=2, dp_rank=1, dp_size=2, step=5)
    assert len(mbs) == 4
    for mb in mbs:
        assert set(mb) == {"tokens", "labels", "loss_mask", "position_ids"}
        for k in mb:
            assert mb[k].shape == (2, SEQ)
        assert torch.equal(mb["tokens"][:, 1:], mb["labels"][:, :-1])
        assert mb["position_ids"].tolist() == [list(range(SEQ))] * 2


def test_same_seed_step_identical_and_steps_differ(dataset):
    kw = dict(seed=42, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    a = micro_batches(dataset, step=3, **kw)
    b = micro_batches(dataset, step=3, **kw)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    c = micro_batches(dataset, step=4, **kw)
    assert _rows(a) != _rows(c)
    d = micro_batches(dataset, step=3, **{**kw, "seed": 43})
    assert _rows(a) != _rows(d)


def test_union_over_dp_ranks_equals_global_batch(dataset):
    for step in (0, 7):
        ref = micro_batches(dataset, seed=5, global_batch_size=16, micro_batch_size=4, dp_rank=0, dp_size=1, step=step)
        for dp_size, mbs in ((2, 4), (2, 2), (4, 1)):
            union = Counter()
            for rank in range(dp_size):
                union += _rows(
                    micro_batches(
                        dataset, seed=5, global_batch_size=16, micro_batch_size=mbs,
                        dp_rank=rank, dp_size=dp_size, step=step,
                    )
                )
            assert union == _rows(ref), (step, dp_size, mbs)


def test_rank_layout_matches_megatron():
    s = GlobalBatchSampler(100, seed=0, global_batch_size=12, micro_batch_size=2, dp_size=3)
    assert s.num_micro_batches == 2
    g = s.global_batch(4)
    # Rank r, micro-batch m takes global-batch positions (m*dp + r)*mbs + b.
    assert [x.tolist() for x in s.rank_micro_batches(4, 1)] == [g[2:4].tolist(), g[8:10].tolist()]


def test_epoch_wrap():
    n, gbs = 10, 4
    s = GlobalBatchSampler(n, seed=9, global_batch_size=gbs, micro_batch_size=2, dp_size=1)
    seq = np.concatenate([s.global_batch(step) for step in range(5)])  # 20 samples = 2 epochs
    epoch0, epoch1 = seq[:n], seq[n:]
    assert sorted(epoch0.tolist()) == list(range(n))
    assert sorted(epoch1.tolist()) == list(range(n))
    assert epoch0.tolist() != epoch1.tolist()  # a fresh permutation per epoch
    assert epoch0.tolist() == np.random.default_rng([9, 0]).permutation(n).tolist()
    # Step 2 straddles the epoch boundary (global samples 8..11).
    assert s.global_batch(2).tolist() == seq[8:12].tolist()
    # The dataset-level function wraps too, far past the first epoch.
    ds = TokenWindowDataset([CorpusDocument("a.py", bytes(range(97, 123)) * 4)], ByteTokenizer(), seq_length=10)
    assert len(ds) == 10
    mbs = micro_batches(ds, seed=9, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, step=1001)
    idx = s.global_batch(1001)
    expected = torch.stack([ds[int(i)]["tokens"] for i in idx])
    assert torch.equal(torch.cat([m["tokens"] for m in mbs]), expected)


def test_bad_divisibility_raises(dataset):
    with pytest.raises(ValueError, match="global_batch_size"):
        micro_batches(dataset, seed=0, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=2, step=0)
    with pytest.raises(ValueError, match="dp_rank"):
        micro_batches(dataset, seed=0, global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2, step=0)


def test_valid_batches_fixed_and_split(dataset):
    one = valid_batches(dataset, micro_batch_size=2, num_batches=3, dp_rank=0, dp_size=1)
    assert one[0]["tokens"].tolist() == [dataset[0]["tokens"].tolist(), dataset[1]["tokens"].tolist()]
    again = valid_batches(dataset, micro_batch_size=2, num_batches=3, dp_rank=0, dp_size=1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(one, again) for k in x)
    # Two ranks with half the batches cover the same first 6 windows.
    two = Counter()
    for r in range(2):
        two += _rows(valid_batches(dataset, micro_batch_size=1, num_batches=3, dp_rank=r, dp_size=2))
    assert two == _rows(one)


def test_valid_batches_wrap_small_dataset():
    ds = TokenWindowDataset([CorpusDocument("a.py", b"0123456789" * 3)], ByteTokenizer(), seq_length=10)
    assert len(ds) == 3
    out = valid_batches(ds, micro_batch_size=2, num_batches=2, dp_rank=0, dp_size=1)
    assert torch.equal(out[1]["tokens"][1], ds[0]["tokens"])  # window 3 wraps to window 0


def test_build_embedded_datasets():
    train, valid, info = build_embedded_datasets(seq_length=64, seed=0, valid_fraction=0.3, max_bytes=300_000)
    docs = gather_stdlib_corpus(max_bytes=300_000)
    assert info["tokenizer"] == "byte" and info["vocab_size"] == 257
    assert info["train_documents"] + info["valid_documents"] == len(docs)
    assert info["train_documents"] > 0 and info["valid_documents"] > 0
    # Every byte becomes one token, plus one eod per document.
    assert info["train_tokens"] + info["valid_tokens"] == sum(len(d.text) for d in docs) + len(docs)
    assert info["train_tokens"] == train.num_tokens and info["valid_windows"] == len(valid)
    assert len(info["corpus_fingerprint"]) == 16
    json.dumps(info)  # must be writable into the run directory
    again = build_embedded_datasets(seq_length=64, seed=0, valid_fraction=0.3, max_bytes=300_000)[2]
    assert again == info


def test_embedded_validation_set_does_not_depend_on_train_seed():
    from rexmoe_train.config.schema import DataConfig
    from rexmoe_train.data.sources import build_datasets

    cfg = DataConfig(valid_fraction=0.05, max_bytes=400_000)
    built = {seed: build_datasets(cfg, 64, seed) for seed in (1, 2)}
    assert built[1][2] == built[2][2]  # same documents on both sides of the split
    kw = dict(micro_batch_size=4, num_batches=3, dp_rank=0, dp_size=1)
    a, b = (torch.cat([x["tokens"] for x in valid_batches(built[s][1], **kw)]) for s in (1, 2))
    assert torch.equal(a, b)
    # the seed still changes the training order
    first = {s: micro_batches(built[s][0], seed=s, global_batch_size=4, micro_batch_size=4, dp_rank=0,
                              dp_size=1, step=0)[0]["tokens"] for s in (1, 2)}
    assert not torch.equal(first[1], first[2])
    # a split seeded by train.seed (the old behaviour) would have scored other documents
    old = build_embedded_datasets(64, 1, 0.05, 400_000)
    assert old[2]["valid_tokens"] != built[1][2]["valid_tokens"]
