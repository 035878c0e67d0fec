"""data.source=indexed: megatron GPTDataset/BlendedDataset behind micro_batches / valid_batches."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rexmoe_train.config.schema import ConfigError, DataConfig
from rexmoe_train.data import micro_batches, valid_batches
from rexmoe_train.data.preprocess import preprocess
from rexmoe_train.data.sources import build_datasets

SEQ = 32
LETTERS = set(b"abcdefghijklm")
DIGITS = set(b"0123456789")


def _write_jsonl(path: Path, alphabet: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                     for _ in range(rng.randint(3, 40))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Two byte-tokenized datasets with disjoint alphabets: a sample's source is visible in it."""
    root = tmp_path_factory.mktemp("indexed")
    out = {}
    for name, alphabet, seed in (("letters", "abcdefghijklm", 1), ("digits", "0123456789", 2)):
        _write_jsonl(root / f"{name}.jsonl", alphabet, 200, seed)
        out[name] = str(root / name)
        preprocess([str(root / f"{name}.jsonl")], out[name], "byte", progress=False)
    out["root"] = root
    return out


def _cfg(prefixes, blend, split="90,10,0", **kw) -> DataConfig:
    return DataConfig(source="indexed", blend=blend, split=split, **kw)


def _build(cfg, tmp_path, seed=7, train_samples=2400, valid_samples=8, cache="cache"):
    return build_datasets(cfg, SEQ, seed, train_samples=train_samples, valid_samples=valid_samples,
                          run_dir=str(tmp_path / cache))


def _source(row: torch.Tensor) -> str:
    content = set(row.tolist()) - {256, ord(" ")}
    if content <= LETTERS:
        return "letters"
    assert content <= DIGITS, content
    return "digits"


def test_blend_follows_weights(megatron_world, prefixes, tmp_path):
    cfg = _cfg(prefixes, [0.25, prefixes["letters"], 0.75, prefixes["digits"]])
    train, valid, info = _build(cfg, tmp_path)
    assert info["vocab_size"] == 257 and info["source"] == "indexed"
    assert [b["weight"] for b in info["blend"]] == [0.25, 0.75]
    assert len(train) >= 2400
    rows, ids = [], []
    for step in range(300):  # 300 steps x 8 samples = 2400 samples
        for batch in micro_batches(train, seed=7, global_batch_size=8, micro_batch_size=4,
                                   dp_rank=0, dp_size=1, step=step):
            assert batch["tokens"].shape == (4, SEQ) and batch["labels"].shape == (4, SEQ)
            assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
            assert torch.equal(batch["position_ids"][0], torch.arange(SEQ))
            assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
            rows.extend(batch["tokens"])
    sources = [_source(r) for r in rows]
    digits_share = sources.count("digits") / len(sources)
    assert abs(digits_share - 0.75) < 0.02, digits_share
    # the contents agree with megatron's own record of which dataset each sample came from
    ids = train.dataset_ids(range(len(rows)))
    assert [("letters", "digits")[i] for i in ids] == sources
    # validation: both datasets' held-out documents, fixed windows
    vb = valid_batches(valid, micro_batch_size=4, num_batches=2, dp_rank=0, dp_size=1)
    assert len(vb) == 2 and vb[0]["tokens"].shape == (4, SEQ)


def test_same_seed_step_same_batch_and_resume(megatron_world, prefixes, tmp_path):
    cfg = _cfg(prefixes, [1, prefixes["letters"], 3, prefixes["digits"]])
    kw = dict(global_batch_size=8, micro_batch_size=2, dp_size=1, dp_rank=0)
    run, _, _ = _build(cfg, tmp_path, train_samples=80)
    uninterrupted = [micro_batches(run, seed=7, step=s, **kw) for s in range(10)]
    # megatron's index is already shuffled and blended: global sample j is sample j
    assert torch.equal(torch.cat([b["tokens"] for b in uninterrupted[2]]),
                       run.get_batch(range(16, 24))["tokens"])
    # a "resumed" process: datasets rebuilt (here from scratch, in a fresh cache), steps 6..9
    resumed, _, _ = _build(cfg, tmp_path, train_samples=80, cache="other_cache")
    for step in range(6, 10):
        again = micro_batches(resumed, seed=7, step=step, **kw)
        for a, b in zip(uninterrupted[step], again):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # a cache hit gives the same samples too
    cached, _, _ = _build(cfg, tmp_path, train_samples=80)
    assert torch.equal(micro_batches(cached, seed=7, step=3, **kw)[0]["tokens"],
                       uninterrupted[3][0]["tokens"])
    # different steps / seeds differ
    assert not torch.equal(uninterrupted[0][0]["tokens"], uninterrupted[1][0]["tokens"])
    other_seed, _, _ = _build(cfg, tmp_path, seed=8, train_samples=80)
    assert not torch.equal(micro_batches(other_seed, seed=8, step=0, **kw)[0]["tokens"],
                           uninterrupted[0][0]["tokens"])
    # data parallel: the ranks' micro-batches together are exactly the global batch
    dp = [micro_batches(run, seed=7, step=4, global_batch_size=8, micro_batch_size=2, dp_size=2,
                        dp_rank=r) for r in range(2)]
    together = torch.cat([b["tokens"] for m in range(2) for r in range(2) for b in [dp[r][m]]])
    assert torch.equal(together, torch.cat([b["tokens"] for b in uninterrupted[4]]))


def test_hf_tokenizer_vocab_from_dataset_tokenizer(megatron_world, prefixes, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [json.loads(line)["text"] for line in open(prefixes["root"] / "letters.jsonl")]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    prefix = str(tmp_path / "words")
    preprocess([str(prefixes["root"] / "letters.jsonl")], prefix, str(tok_path), progress=False)
    train, _, info = _build(_cfg(prefixes, [prefix], tokenizer=str(tok_path)), tmp_path, train_samples=16)
    assert info["vocab_size"] == tok.get_vocab_size() != 257
    assert info["eod"] == tok.token_to_id("<|endoftext|>")
    assert int(train.get_batch(range(16))["tokens"].max()) < info["vocab_size"]


def _one_line_error(cfg, tmp_path) -> str:
    with pytest.raises(ConfigError) as err:
        _build(cfg, tmp_path, train_samples=16)
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: data.")
    assert not (tmp_path / "cache").exists()  # nothing built or written
    return message


def test_bad_data_fails_before_training(megatron_world, prefixes, tmp_path):
    assert "not found" in _one_line_error(_cfg(prefixes, [str(tmp_path / "absent")]), tmp_path)
    # a sidecar that disagrees with the tokenizer's vocabulary
    copy = tmp_path / "copy"
    for ext in ("bin", "idx", "json"):
        shutil.copy(f"{prefixes['digits']}.{ext}", f"{copy}.{ext}")
    sidecar = json.loads(Path(f"{copy}.json").read_text())
    Path(f"{copy}.json").write_text(json.dumps({**sidecar, "vocab_size": 50257}))
    message = _one_line_error(_cfg(prefixes, [1, prefixes["letters"], 1, str(copy)]), tmp_path)
    assert "vocab size 50257" in message and str(copy) in message
    # a truncated .bin
    Path(f"{copy}.json").write_text(json.dumps(sidecar))
    with open(f"{copy}.bin", "r+b") as f:
        f.truncate(Path(f"{copy}.bin").stat().st_size - 10)
    assert "truncated" in _one_line_error(_cfg(prefixes, [str(copy)]), tmp_path)
    # a damaged index
    Path(f"{copy}.idx").write_bytes(b"garbage")
    assert "damaged" in _one_line_error(_cfg(prefixes, [str(copy)]), tmp_path)
    # a split that leaves no validation documents
    assert "valid split" in _one_line_error(_cfg(prefixes, [prefixes["letters"]], split="99.9,0.1,0"),
                                            tmp_path)
    # a tokenizer.json that does not exist
    assert "data.tokenizer" in _one_line_error(
        _cfg(prefixes, [prefixes["letters"]], tokenizer=str(tmp_path / "no.json")), tmp_path)


@pytest.mark.parametrize("change,field", [
    ({"source": "indexed"}, "data.blend"),
    ({"source": "indexed", "blend": [0.5, "a", "b"]}, "data.blend"),
    ({"source": "indexed", "blend": [-1, "a"]}, "data.blend"),
    ({"source": "indexed", "blend": ["a"], "split": "100,0,0"}, "data.split"),
    ({"source": "indexed", "blend": ["a"], "split": "a,b"}, "data.split"),
    ({"source": "embedded", "blend": ["a"]}, "data.blend"),
    ({"source": "embedded", "tokenizer": "t.json"}, "data.tokenizer"),
    ({"source": "mmap"}, "data.source"),
])
def test_static_validation(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DataConfig(**change).validate()
    assert DataConfig(source="indexed", blend="a/b").blend_spec() == (["a/b"], None)
    assert DataConfig(source="indexed", blend=[2, "a", 1, "b"]).blend_spec() == (["a", "b"], [2.0, 1.0])
    np.testing.assert_allclose(DataConfig(split="98,2").split_shares(), [98, 2, 0])


def test_validation_windows_do_not_depend_on_train_seed(megatron_world, prefixes, tmp_path):
    """train.seed shuffles the training samples; the validation windows scored are the same."""
    cfg = _cfg(prefixes, [1, prefixes["letters"], 3, prefixes["digits"]])
    kw = dict(micro_batch_size=4, num_batches=2, dp_rank=0, dp_size=1)
    runs = {seed: _build(cfg, tmp_path, seed=seed, train_samples=80, cache=f"c{seed}") for seed in (7, 8, 42)}
    valid = {seed: torch.cat([b["tokens"] for b in valid_batches(r[1], **kw)]) for seed, r in runs.items()}
    assert torch.equal(valid[7], valid[8]) and torch.equal(valid[7], valid[42])
    first = {seed: r[0].get_batch(range(8))["tokens"] for seed, r in runs.items()}
    assert not torch.equal(first[7], first[8])  # the seed still orders the training samples
    assert runs[7][2]["split_seed"] == runs[8][2]["split_seed"] and runs[7][2]["shuffle_seed"] == 7
    # the validation samples really are held-out documents: megatron's own valid split at seed 42
    from rexmoe_train.data.loader import VALID_SPLIT_SEED

    assert VALID_SPLIT_SEED == 42 and torch.equal(valid[42], valid[7])
