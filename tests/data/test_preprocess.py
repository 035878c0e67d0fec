"""rexmoe-preprocess: jsonl/text -> megatron indexed datasets, read back with megatron itself."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rexmoe_train import compat

compat.install()
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from rexmoe_train.cli.preprocess import main  # noqa: E402
from rexmoe_train.data.preprocess import preprocess  # noqa: E402

WORDS = ("expert router layer reuse group token bank gate shard über naïve 漢字 mixture "
         "capacity balance").split()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    docs[3] = "line one\nline two\ttab \"quoted\""
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = _docs(150, seed=0)
    jsonl = root / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text, "meta": {"n": i}}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are not documents
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=120,
                                                      special_tokens=["[UNK]", "</s>"]))
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    return {"root": root, "docs": docs, "jsonl": jsonl, "tokenizer": tok_path}


def _read_back(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_byte_tokenizer_multiprocess_keeps_order(corpus, tmp_path):
    prefix = tmp_path / "out" / "byte"  # the directory is created
    meta = preprocess([str(corpus["jsonl"])], str(prefix), "byte", workers=2, chunk_lines=7,
                      progress=False)
    expected = [list(text.encode("utf-8")) + [256] for text in corpus["docs"]]
    assert _read_back(prefix) == expected
    assert _listing(prefix.parent) == {"byte.bin", "byte.idx", "byte.json"}  # no temp files
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar == meta
    assert (sidecar["tokenizer"], sidecar["vocab_size"], sidecar["eod"]) == ("byte", 257, 256)
    assert sidecar["documents"] == 150 and sidecar["tokens"] == sum(map(len, expected))


def test_hf_tokenizer_json_equals_direct_tokenization(corpus, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus["tokenizer"]))
    eod = tok.token_to_id("</s>")
    prefix = tmp_path / "hf"
    rc = main(["-i", str(corpus["jsonl"]), "-o", str(prefix), "-t", str(corpus["tokenizer"]),
               "--workers", "2", "--chunk-lines", "16", "--no-progress"])
    assert rc == 0
    expected = [tok.encode(text, add_special_tokens=False).ids + [eod] for text in corpus["docs"]]
    assert _read_back(prefix) == expected
    assert all(len(doc) > 1 for doc in expected)
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar["tokenizer"] == "huggingface" and sidecar["eod"] == eod
    assert sidecar["eod_token"] == "</s>" and sidecar["vocab_size"] == tok.get_vocab_size()


def test_text_files_one_document_each_and_overwrite(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("first file\nwith two lines\n", encoding="utf-8")
    b.write_text("zweite Datei ü", encoding="utf-8")
    prefix = tmp_path / "txt"
    preprocess([str(a), str(b)], str(prefix), progress=False)
    assert _read_back(prefix) == [list(a.read_bytes()) + [256], list(b.read_bytes()) + [256]]
    assert main(["-i", str(b), "-o", str(prefix), "--no-progress"]) == 2  # exists, no --overwrite
    assert main(["-i", str(b), "-o", str(prefix), "--overwrite", "--no-progress"]) == 0
    assert _read_back(prefix) == [list(b.read_bytes()) + [256]]


def _bad_jsonl(root: Path) -> Path:
    path = root / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    return path


@pytest.mark.parametrize("case,phrase", [
    ("missing_input", "input not found"),
    ("bad_field", "no field 'content'"),
    ("bad_field_in_worker", "no field 'content'"),
    ("bad_json", "bad.jsonl:3: not a JSON object"),
    ("unreadable_tokenizer", "cannot read tokenizer file"),
    ("missing_tokenizer", "tokenizer file not found"),
    ("no_eod_token", "--eod-token"),
])
def test_bad_inputs_one_line_exit_2_nothing_left(corpus, tmp_path, capsys, case, phrase):
    out = tmp_path / "out"
    out.mkdir()
    args = ["-i", str(corpus["jsonl"]), "-o", str(out / "ds"), "--no-progress"]
    if case == "missing_input":
        args[1] = str(tmp_path / "nope.jsonl")
    elif case == "bad_field":
        args += ["--json-key", "content", "--workers", "1"]
    elif case == "bad_field_in_worker":
        args += ["--json-key", "content", "--workers", "2", "--chunk-lines", "20"]
    elif case == "bad_json":
        args[1] = str(_bad_jsonl(tmp_path))
    elif case == "unreadable_tokenizer":
        garbage = tmp_path / "tokenizer.json"
        garbage.write_text('{"model": {"type": "BPE", "vocab": ')
        args += ["-t", str(garbage)]
    elif case == "missing_tokenizer":
        args += ["-t", str(tmp_path / "absent" / "tokenizer.json")]
    elif case == "no_eod_token":
        args += ["-t", str(corpus["tokenizer"]), "--eod-token", "<|im_end|>"]
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("rexmoe-preprocess: error:") and phrase in lines[0], err
    assert _listing(out) == set()


def test_console_script_error(tmp_path):
    """The installed entry point: exit 2, one line, before anything heavy is imported."""
    exe = Path(sys.executable).with_name("rexmoe-preprocess")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rexmoe_train.cli.preprocess"]
    proc = subprocess.run(cmd + ["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "input not found" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_token_dtype_rule():
    """megatron's rule: uint16 tokens below 65500 ids, int32 above."""
    from rexmoe_train.data.text_tokenizer import token_dtype

    assert token_dtype(257) == np.uint16 and token_dtype(70_000) == np.int32
