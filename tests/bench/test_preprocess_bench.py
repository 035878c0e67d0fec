"""bench/preprocess_bench.py on a small prefix of the corpus with the byte tokenizer: every format
(jsonl, Parquet, .jsonl.zst) gives the same documents, and the byte tokenizer's token count is known
independently (one token per UTF-8 byte plus one eod per document). The throughput figures themselves
are recorded by hand in docs/benchmarks.md: speed targets are not timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "preprocess_bench.py"


def test_every_format_same_documents_and_tokens(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(_PATH), "--tokenizer", "byte", "--workers", "1", "--repeats", "1",
                           "--copies", "1", "--max-bytes", "150000", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["format"] for r in rows] == ["jsonl", "parquet", "jsonl.zst"]
    assert result["text_bytes"] >= 150000
    for r in rows:
        assert r["tokens"] == result["text_bytes"] + result["documents"], r
        assert r["documents"] == result["documents"] and r["text_mb_s"] > 0 and r["tokens_per_s"] > 0
    assert "parquet" in proc.stdout and "tokens/s" in proc.stdout
