"""`rexmoe-train data.source=indexed` on data made by rexmoe-preprocess, as a user runs it: corpora as
they are published (Parquet, .jsonl.zst) and a Hugging Face tokenizer folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rexmoe_train.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[2]


def run_cli(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "rexmoe_train.cli.train", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _make_data(root: Path) -> tuple[list[str], Path]:
    """a: a Parquet file; b: a .jsonl.zst; both tokenized with a save_pretrained tokenizer folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = "the router picks experts from every layer of its reuse group".split()
    docs = {name: [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)] for name in ("a", "b")}
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs["a"] + docs["b"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    folder = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(folder)
    pq.write_table(pa.table({"text": docs["a"]}), root / "a.parquet", row_group_size=25)
    raw = "".join(json.dumps({"text": text}) + "\n" for text in docs["b"]).encode()
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    for name, suffix in (("a", ".parquet"), ("b", ".jsonl.zst")):
        preprocess([str(root / f"{name}{suffix}")], str(root / name), str(folder), progress=False)
    return [str(root / "a"), str(root / "b")], folder


SMALL = ("train.train_iters=3", "train.eval_interval=3", "train.eval_iters=1", "train.seq_length=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr_warmup_iters=1",
         "rexmoe.psr.start_step=0", "rexmoe.psr.end_step=2", "run.progress=false")


@pytest.mark.slow  # a real end-to-end CLI run
def test_train_on_preprocessed_blend(tmp_path):
    (a, b), folder = _make_data(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_cli("data.source=indexed", f"data.blend=[0.4,{a},0.6,{b}]", 'data.split="90,10,0"',
                   f"data.tokenizer={folder}", *SMALL, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]
    data = json.loads((run_dir / "data.json").read_text())
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert data["source"] == "indexed" and data["vocab_size"] == len(vocab) == 13
    assert data["tokenizer"] == str(folder) and data["eod"] == vocab["</s>"]
    assert [entry["prefix"] for entry in data["blend"]] == [a, b]
    assert (run_dir / "data_cache").is_dir()


def test_missing_prefix_one_line_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("data.source=indexed", f"data.blend=[{tmp_path / 'absent'}]", *SMALL,
                   f"run.dir={run_dir}", timeout=200)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.blend" in lines[0] and "not found" in lines[0], proc.stderr
    assert not run_dir.exists()
