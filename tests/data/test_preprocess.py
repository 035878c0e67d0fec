"""rexmoe-preprocess: jsonl / Parquet / zstd / text -> megatron indexed datasets, read back with megatron
itself; Hugging Face tokenizer files and folders checked against the tokenizer libraries' own encodings."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    return {"root": root, "docs": docs, "jsonl": jsonl, "tokenizer": tok_path,
            "parquet": _write_parquet(root / "docs.parquet", docs), "zst": _write_zst(root / "docs.jsonl.zst", jsonl)}


def _write_parquet(path: Path, docs: list[str], row_group_size: int = 60) -> Path:
    """FineWeb's layout: several row groups, the text among other columns; page checksums on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "text": docs, "score": [0.5] * len(docs)})
    pq.write_table(table, path, row_group_size=row_group_size, write_page_checksum=True)
    assert pq.ParquetFile(path).num_row_groups == -(-len(docs) // row_group_size)
    return path


def _write_zst(path: Path, jsonl: Path) -> Path:
    """The jsonl as three zstd frames (as multi-threaded and appending writers leave them)."""
    import zstandard

    raw = jsonl.read_bytes()
    cuts = [0, len(raw) // 3, 2 * len(raw) // 3, len(raw)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(raw[a:b]) for a, b in zip(cuts, cuts[1:])))
    return path


def _hf_folder(corpus, root: Path, eos_token: str) -> Path:
    """A save_pretrained folder (tokenizer.json + tokenizer_config.json + special_tokens_map.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus["docs"], trainers.BpeTrainer(vocab_size=140,
                                                                special_tokens=["[UNK]", "</s>", "[END]"]))
    folder = root / "hf-folder"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, unk_token="[UNK]").save_pretrained(folder)
    return folder


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


def test_parquet_and_zstd_equal_jsonl(corpus, tmp_path):
    """A Parquet file (4 row groups) and a 3-frame .jsonl.zst give exactly the jsonl's documents; mixed
    with the jsonl, in input order, over 2 workers and chunks that cut row groups and frames."""
    from_jsonl = tmp_path / "jsonl"
    preprocess([str(corpus["jsonl"])], str(from_jsonl), "byte", progress=False)
    expected = _read_back(from_jsonl)
    assert len(expected) == len(corpus["docs"])
    for name in ("parquet", "zst"):
        prefix = tmp_path / name
        meta = preprocess([str(corpus[name])], str(prefix), "byte", workers=2, chunk_lines=13, progress=False)
        assert _read_back(prefix) == expected, name
        assert meta["documents"] == len(expected) and meta["inputs"] == [str(corpus[name])]
    mixed = tmp_path / "mixed"
    rc = main(["-i", str(corpus["zst"]), str(corpus["parquet"]), str(corpus["jsonl"]), "-o", str(mixed),
               "--text-column", "text", "-j", "2", "--chunk-lines", "50", "--no-progress"])
    assert rc == 0 and _read_back(mixed) == expected * 3


def test_hf_tokenizer_folder_reads_its_eos_token(corpus, tmp_path):
    """A save_pretrained folder: the ids are AutoTokenizer's own, eod is the folder's eos_token ([END],
    not the </s> the tokenizer also defines), and the sha256 is its tokenizer.json's."""
    from transformers import AutoTokenizer

    from rexmoe_train.data.text_tokenizer import load_tokenizer

    folder = _hf_folder(corpus, tmp_path, eos_token="[END]")
    assert {"tokenizer.json", "tokenizer_config.json"} <= _listing(folder)
    reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    prefix = tmp_path / "folder"
    meta = preprocess([str(corpus["parquet"])], str(prefix), str(folder), workers=2, chunk_lines=16, progress=False)
    eod = reference.convert_tokens_to_ids("[END]")
    assert eod != reference.convert_tokens_to_ids("</s>")
    expected = [reference.encode(text, add_special_tokens=False) + [eod] for text in corpus["docs"]]
    assert _read_back(prefix) == expected
    assert (meta["eod"], meta["eod_token"], meta["vocab_size"]) == (eod, "[END]", len(reference))
    assert meta["tokenizer_path"] == str(folder) and meta["tokenizer_name"] == "hf-folder"
    # the folder and its own tokenizer.json are one tokenizer (training accepts either for this data)
    assert meta["tokenizer_sha256"] == load_tokenizer(str(folder / "tokenizer.json")).sha256
    assert load_tokenizer(str(folder), "</s>").eod == reference.convert_tokens_to_ids("</s>")  # --eod-token wins


def _sentencepiece_folder(corpus, root: Path) -> tuple[Path, Any]:
    """A Llama-2 style folder: a sentencepiece tokenizer.model and tokenizer_config.json, no tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    text = root / "spm.txt"
    text.write_text("\n".join(corpus["docs"]), encoding="utf-8")
    # Llama-2's settings: byte_fallback (characters outside the vocabulary become byte pieces, not <unk>),
    # no normalization (newlines and tabs are kept)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / "spm"), vocab_size=320, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    folder = root / "llama-style"
    folder.mkdir()
    (root / "spm.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder, spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_sentencepiece_folder_through_transformers(corpus, tmp_path, monkeypatch):
    """tokenizer.model only: converted by AutoTokenizer; the ids are sentencepiece's own. Without
    transformers: one line saying what to install."""
    from rexmoe_train.data.text_tokenizer import TokenizerLoadError, load_tokenizer

    folder, sp = _sentencepiece_folder(corpus, tmp_path)
    docs = corpus["docs"][:40] + ["characters it never saw: ©, ₀ and 🙂"]
    jsonl = tmp_path / "few.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    meta = preprocess([str(jsonl)], str(tmp_path / "spm"), str(folder), progress=False)
    assert (meta["eod"], meta["vocab_size"]) == (sp.eos_id(), sp.get_piece_size())
    assert _read_back(tmp_path / "spm") == [sp.encode(d) + [sp.eos_id()] for d in docs]
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(TokenizerLoadError, match="pip install transformers sentencepiece") as err:
        load_tokenizer(str(folder))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


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


def _damaged_row_group(corpus, root: Path) -> Path:
    """Row group 1 of the Parquet file with its text column's page header overwritten."""
    import pyarrow.parquet as pq

    path = root / "damaged.parquet"
    path.write_bytes(corpus["parquet"].read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    assert chunk.path_in_schema == "text"
    with open(path, "r+b") as f:
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(b"\xff" * 32)
    return path


def _truncated(path: Path, root: Path, cut: int = 40) -> Path:
    out = root / path.name
    out.write_bytes(path.read_bytes()[:-cut])
    return out


@pytest.mark.parametrize("case,phrase", [
    ("missing_input", "input not found"),
    ("bad_field", "no field 'content'"),
    ("bad_field_in_worker", "no field 'content'"),
    ("bad_json", "bad.jsonl:3: not a JSON object"),
    ("unreadable_tokenizer", "cannot read tokenizer file"),
    ("missing_tokenizer", "tokenizer file not found"),
    ("no_eod_token", "--eod-token"),
    ("parquet_missing_column", "docs.parquet: no column 'content' (columns: id, text, score); choose one with --text-column"),
    ("parquet_not_text", "docs.parquet: column 'score' is double, not a string column"),
    ("parquet_damaged_row_group", "damaged.parquet: row group 1 (0-based, of 3; rows 60-119) cannot be read"),
    ("zstd_truncated", "docs.jsonl.zst:{line}: truncated zstd frame (the file ends at byte {size} inside a frame)"),
    ("zstd_damaged", "docs.jsonl.zst:1: damaged zstd data in compressed bytes 0-"),
    ("gzip_truncated", "docs.jsonl.gz:{line}: damaged or truncated gzip data"),
    ("folder_without_tokenizer", "has neither tokenizer.json nor a sentencepiece tokenizer.model"),
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
    elif case.startswith("parquet_"):
        # 1 worker, small chunks: row group 0's documents are written before the damage is met
        args[1] = str(corpus["parquet"] if case != "parquet_damaged_row_group" else _damaged_row_group(corpus, tmp_path))
        args += ["--json-key", {"parquet_missing_column": "content", "parquet_not_text": "score"}.get(case, "text"),
                 "--workers", "1", "--chunk-lines", "20"]
    elif case == "zstd_truncated":
        args[1] = str(_truncated(corpus["zst"], tmp_path))
        whole = corpus["zst"].read_bytes()
        import zstandard  # the reference: how many whole lines the cut file still holds

        obj = zstandard.ZstdDecompressor().decompressobj()
        data = b""
        rest = whole[:-40]
        while rest:
            data += obj.decompress(rest)
            rest = obj.unused_data if obj.eof else b""
            obj = zstandard.ZstdDecompressor().decompressobj() if rest else obj
        phrase = phrase.format(line=data.count(b"\n") + 1, size=len(whole) - 40)
        args += ["--workers", "2", "--chunk-lines", "10"]
    elif case == "zstd_damaged":
        bad = tmp_path / "docs.jsonl.zst"
        bad.write_bytes(corpus["jsonl"].read_bytes()[:300])  # named .zst, but not compressed
        args[1] = str(bad)
    elif case == "gzip_truncated":
        import gzip

        whole = gzip.compress(corpus["jsonl"].read_bytes())
        cut = tmp_path / "docs.jsonl.gz"
        cut.write_bytes(whole[: len(whole) // 2])
        args[1] = str(cut)
        with gzip.open(cut, "rb") as f:  # the reference: the whole lines before the cut
            lines = 0
            with pytest.raises(EOFError):
                for _ in f:
                    lines += 1
        phrase = phrase.format(line=lines + 1)
    elif case == "folder_without_tokenizer":
        (tmp_path / "empty-folder").mkdir()
        args += ["-t", str(tmp_path / "empty-folder")]
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
