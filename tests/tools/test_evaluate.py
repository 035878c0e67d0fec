"""`rexmoe-eval` on a real training checkpoint: the trainer's val_loss, perplexity, router loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.moe_ffn_hidden_size=64", "train.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.lr_warmup_iters=1",
        "train.train_iters=2", "train.eval_interval=2", "run.progress=false", "run.wandb.mode=disabled",
        # PSR on (the packaged default has it off), so the checkpoint's step decides the candidates
        "rexmoe.psr.schedule=linear"]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "run"
    proc = run("rexmoe_train.cli.train", *TINY, f"run.dir={root}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_eval_matches_trainer_val_loss(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = run("rexmoe_train.cli.eval", str(trained_run / "checkpoints"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val loss" in proc.stdout and "perplexity" in proc.stdout
    result = json.loads(out.read_text())
    logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    want = next(r["val_loss"] for r in logged if r["step"] == 2 and "val_loss" in r)
    assert result["step"] == 2 and result["psr"] == {"mode": "checkpoint", "step": 2, "candidates": 8}
    assert result["val_loss"] == pytest.approx(want, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-12)
    # the trainer's evaluation: train.eval_iters (4) micro-batches of 2 windows of 32 tokens
    assert result["batches"] == 4 and result["tokens"] == 4 * 2 * 32
    router = result["router"]
    assert len(router["load_violation_max"]) == 4 and len(router["group_load_violation_max"]) == 1
    (group,) = router["expert_load"]
    assert len(group) == 4 and all(len(layer) == 32 for layer in group)
    assert all(sum(layer) == result["tokens"] * router["topk"] for layer in group)
    assert all(abs(sum(row) - 1) < 1e-3 for row in router["reuse_matrix"][0])


def test_full_psr_and_bad_inputs(trained_run, tmp_path, capsys, megatron_world):
    """In-process (megatron is imported once): --psr-step full, then bad inputs -> one line, exit 2."""
    from rexmoe_train.cli.eval import main

    full = tmp_path / "full.json"
    assert main([str(trained_run / "checkpoints"), "--psr-step", "full", "--batches", "1",
                 "--out", str(full)]) == 0
    result = json.loads(full.read_text())
    assert result["written_by"] == "rexmoe-eval"  # the mark that lets a later --overwrite replace it
    # all r*N = 32 candidates open, as in an exported model
    assert result["psr"]["candidates"] == 32 and result["tokens"] == 2 * 32
    assert all(sum(layer) == 2 * 32 * 2 for layer in result["router"]["expert_load"][0])
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {"no such checkpoint": [str(tmp_path / "missing")],
             "--batches must be >= 1": [str(trained_run / "checkpoints"), "--batches", "0"],
             "not a ReXMoE checkpoint": [str(empty)]}
    for why, args in cases.items():
        assert main(args) == 2, why
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rexmoe-eval: ") and why in err[0], err
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: one line too
        main([str(empty), "--batches", "many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "invalid int value: 'many'" in err[0], err
