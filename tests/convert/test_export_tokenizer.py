"""export-hf ships a tokenizer that stock transformers' AutoTokenizer turns into the training ids."""

from __future__ import annotations

import json
import random

import pytest

from tests.helpers import tiny_config

transformers = pytest.importorskip("transformers")

WORDS = ("expert router layer reuse group token bank gate shard über naïve 漢字 mixture capacity "
         "balance, the end. (ok) don't 42 3.14 \t tabs  double  spaces\nnew line").split(" ")


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _export(tmp_path, cfg, tokenizer_spec: str, vocab: int):
    """A real export of a (randomly initialised) model of the tokenizer's vocabulary."""
    from rexmoe_train.convert.export import export_hf, export_tokenizer
    from rexmoe_train.model.gpt import build_model

    model = build_model(cfg, vocab)
    tokenizer = export_tokenizer(tokenizer_spec, cfg, vocab)
    out = export_hf(cfg, model.chunks[0].state_dict(), model.vocab_size, tmp_path / "hf", tokenizer=tokenizer,
                    tokenizer_vocab_size=vocab, progress=False)
    return out, tokenizer


@pytest.mark.parametrize("template", [False, True])
def test_bpe_export_gives_the_preprocessed_ids(tmp_path, layout, template):
    """A BPE with a Metaspace pre-tokenizer (not Qwen2's) and, optionally, a BOS template: the ids
    rexmoe-preprocess wrote to the .bin are what AutoTokenizer gives on the export."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from rexmoe_train.data.preprocess import preprocess

    train_texts, texts = _texts(300, seed=0), _texts(40, seed=1)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(train_texts, trainers.BpeTrainer(vocab_size=300,
                                                             special_tokens=["<unk>", "<s>", "</s>"]))
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    spec = str(path.parent) if template else str(path)  # a tokenizer folder, or the tokenizer.json itself
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    meta = preprocess([str(jsonl)], str(tmp_path / "ds"), spec, progress=False)
    ds = IndexedDataset(str(tmp_path / "ds"))
    training_ids = [ds[i].tolist() for i in range(len(ds))]
    eod = meta["eod"]
    assert eod == tok.token_to_id("</s>") and all(ids[-1] == eod for ids in training_ids)

    cfg = tiny_config(r=2, layers=2)
    cfg.data.source, cfg.data.tokenizer = "indexed", spec
    layout(cfg.parallel)
    out, shipped = _export(tmp_path, cfg, spec, meta["vocab_size"])
    assert ("template" in shipped.note) == template
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    got = [auto(t)["input_ids"] for t in texts]
    assert got == [ids[:-1] for ids in training_ids]
    assert auto.eos_token_id == eod and auto.pad_token_id == eod
    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.eos_token_id == eod
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == eod


def test_byte_export_gives_the_byte_ids(tmp_path, layout):
    from rexmoe_train.data import ByteTokenizer

    cfg = tiny_config(r=2, layers=2)
    layout(cfg.parallel)
    out, shipped = _export(tmp_path, cfg, "byte", 257)
    assert shipped.eos_token_id == 256
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    byte = ByteTokenizer()
    every_byte_char = "".join(chr(c) for c in range(1, 0x250))  # every byte value as lead or tail byte
    texts = _texts(20, seed=2) + [every_byte_char, "  lead and trail  ", "a literal <|endoftext|> is text",
                                  "\x00nul", "emoji 🤗 and CJK 漢字", ""]
    for text in texts:
        ids = auto(text)["input_ids"]
        assert ids == byte.encode(text), text
        assert auto.decode(ids) == text
    assert auto.eos_token_id == 256 and auto.decode([104, 105, 256]) == "hi<|endoftext|>"
    assert transformers.AutoConfig.from_pretrained(str(out)).eos_token_id == 256
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == 256


def test_wrong_tokenizer_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from rexmoe_train.convert.export import export_tokenizer
    from rexmoe_train.convert.hf_format import ConvertError

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(100, seed=0), trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(ConvertError, match="trained with a vocabulary of 257"):
        export_tokenizer(str(tmp_path / "t.json"), tiny_config(), 257)
