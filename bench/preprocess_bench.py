#!/usr/bin/env python3
"""rexmoe-preprocess throughput: the same documents as a Parquet file, jsonl and .jsonl.zst, side by side.

    OMP_NUM_THREADS=1 python bench/preprocess_bench.py [--workers 1,2] [--repeats 2] [--copies 2] \
        [--tokenizer bpe|byte|PATH] [--max-bytes N] [--out r.json]

The documents are the embedded corpus (the interpreter's standard-library sources,
rexmoe_train/data/corpus.py), repeated ``--copies`` times, written once as ``docs.jsonl`` (one JSON
object per line, the text under "text") and once as ``docs.parquet`` (a "text" and an "id" column,
snappy-compressed, row groups of 1024 rows, as FineWeb ships them), and the jsonl once more as
``docs.jsonl.zst`` (zstd level 3, as Dolma / RedPajama ship theirs). Each (format, workers) pair runs
``rexmoe_train.data.preprocess.preprocess`` --repeats times; the fastest run counts. Tokenizer
``bpe`` (default) is a byte-level BPE of at most 32,000 ids (Llama-2's vocabulary size) trained here
on half the documents, ``byte`` the byte tokenizer, anything else a tokenizer.json or tokenizer folder.

Reported: text MB/s (UTF-8 bytes of the documents per second, the same numerator for every format),
file MB/s (input file bytes per second: jsonl is larger, escaped; Parquet compressed), tokens/s.
Prints a table and JSON (--out). Speed targets are met here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _documents(copies: int, max_bytes: int | None) -> list[str]:
    from rexmoe_train.data.corpus import gather_stdlib_corpus

    texts = [doc.text.decode("utf-8", errors="replace") for doc in gather_stdlib_corpus(max_bytes)]
    return texts * copies


def _write_inputs(root: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = root / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    parquet = root / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), parquet, row_group_size=1024,
                   compression="snappy")
    import zstandard

    zst = root / "docs.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=3).compress(jsonl.read_bytes()))
    return {"jsonl": jsonl, "parquet": parquet, "jsonl.zst": zst}


def _tokenizer(spec: str, root: Path, docs: list[str]) -> str:
    if spec != "bpe":
        return spec
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[: len(docs) // 2], trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = root / "bpe32k.json"
    tok.save(str(path))
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--copies", type=int, default=2, help="times the corpus is repeated (default: 2)")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument("--max-bytes", type=int, default=None, help="a prefix of the corpus (default: all of it)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from rexmoe_train.data.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        root = Path(tmp)
        docs = _documents(args.copies, args.max_bytes)
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        inputs = _write_inputs(root, docs)
        tokenizer = _tokenizer(args.tokenizer, root, docs)
        rows = []
        for n in workers:
            for fmt in ("jsonl", "parquet", "jsonl.zst"):
                times, meta = [], None
                for r in range(args.repeats):
                    prefix = root / f"out_{fmt.replace('.', '_')}_{n}_{r}"
                    start = time.perf_counter()
                    meta = preprocess([str(inputs[fmt])], str(prefix), tokenizer, workers=n, progress=False)
                    times.append(time.perf_counter() - start)
                    for ext in ("bin", "idx", "json"):
                        os.remove(f"{prefix}.{ext}")
                best = min(times)
                rows.append({"format": fmt, "workers": n, "seconds": round(best, 3),
                             "seconds_all": [round(t, 3) for t in times],
                             "file_bytes": inputs[fmt].stat().st_size, "text_bytes": text_bytes,
                             "documents": meta["documents"], "tokens": meta["tokens"],
                             "text_mb_s": round(text_bytes / best / 1e6, 2),
                             "file_mb_s": round(inputs[fmt].stat().st_size / best / 1e6, 2),
                             "tokens_per_s": round(meta["tokens"] / best)})
        result = {"tokenizer": args.tokenizer if args.tokenizer != "bpe" else "bpe (at most 32,000 ids, trained here)",
                  "vocab_size": meta["vocab_size"], "documents": len(docs), "text_bytes": text_bytes,
                  "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1), "rows": rows}

    print(f"tokenizer {result['tokenizer']}, {len(docs)} documents, {text_bytes / 1e6:.1f} MB of text, "
          f"{result['cpus']} CPUs, load {result['load_average_1m']}")
    print(f"{'format':9} {'workers':>7} {'file MB':>8} {'s':>7} {'text MB/s':>10} {'file MB/s':>10} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['format']:9} {r['workers']:>7} {r['file_bytes'] / 1e6:>8.1f} {r['seconds']:>7.2f} "
              f"{r['text_mb_s']:>10.2f} {r['file_mb_s']:>10.2f} {r['tokens_per_s']:>10,}")
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    # both formats must give the same documents and tokens, or the comparison is meaningless
    assert len({(r["documents"], r["tokens"]) for r in rows}) == 1, rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
