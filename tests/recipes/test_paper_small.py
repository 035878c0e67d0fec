"""recipes/paper_small/run.py: the variants' settings, bad arguments, and one real end-to-end run of
two variants (a few steps each) producing the table, the JSON and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import script_module

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "paper_small" / "run.py"


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def _recipe():
    with script_module(SCRIPT, "paper_small_run") as module:
        return module


def test_variants_follow_the_papers_ramp():
    recipe = _recipe()
    by_name = {v.name: v for v in recipe.VARIANTS}
    assert list(by_name) == ["r1", "r2_nopsr", "r4_nopsr", "r4_linear", "r4_stepwise", "r8_linear"]
    # the paper's 2.3B run: linear 10k -> 30k of 47.7k steps; stepwise +N at 10k / 20k / 30k
    assert by_name["r4_linear"].overrides(47_700) == [
        "rexmoe.reuse_group_size=4", "rexmoe.psr.schedule=linear",
        "rexmoe.psr.start_step=10000", "rexmoe.psr.end_step=30000"]
    assert by_name["r4_stepwise"].overrides(47_700)[2:] == ["rexmoe.psr.start_step=0",
                                                            "rexmoe.psr.end_step=30000"]
    from rexmoe_train.core.psr import PSRSchedule

    step = PSRSchedule("stepwise", 64, 4, 0, 30_000)  # N=64, r=4: 64 / 128 / 192 / 256
    assert [step.num_candidates(t) for t in (9_999, 10_000, 20_000, 30_001)] == [64, 128, 192, 256]
    assert by_name["r8_linear"].overrides(600)[2:] == ["rexmoe.psr.start_step=126", "rexmoe.psr.end_step=377"]


@pytest.mark.parametrize("args,message", [
    (["--only", "r3"], "--only 'r3': allowed values are r1, r2_nopsr"),
    (["--steps", "0"], "--steps=0: must be >= 1"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments_are_one_line(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]


def test_two_variants_end_to_end(tmp_path):
    out = tmp_path / "ps"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "3", "--only", "r1", "r2_nopsr",
           "--eval-batches", "2", "model.num_layers=2", "train.seq_length=64", "train.lr_warmup_iters=1",
           "train.eval_interval=2", "train.eval_iters=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["r1", "r2_nopsr"]
    h, n, layers = 128, 8, 2
    # router overhead is exactly the extra rows: (r-1) * N * hidden per MoE layer
    assert runs["r1"]["router_overhead"] == 0
    assert runs["r2_nopsr"]["router_overhead"] == (2 - 1) * n * h * layers
    for run in runs.values():
        assert run["step"] == 3 and run["tokens"] == 3 * 8 * 64
        assert 0 < run["val_loss"] < 10 and len(run["maxvio_per_layer"]) == layers
        assert [step for step, _ in run["val_curve"]] == [0, 2 * 8 * 64, 3 * 8 * 64]  # incl. step 0
        # the table's loss is rexmoe-eval's, on the same held-out batches for every run
        ev = json.loads((out / run["name"] / "eval.json").read_text())
        assert ev["val_loss"] == run["val_loss"] and ev["batches"] == 2
    table = (out / "results.md").read_text()
    assert "| vanilla MoE (r=1) |" in table and "| reuse r=2, no PSR |" in table
    assert (out / "val_loss.png").stat().st_size > 1000
    # a second invocation trains nothing again (both runs reached --steps) and reports the same
    again = subprocess.run(cmd + ["--report-only"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "trained" not in again.stdout
    assert json.loads((out / "results.json").read_text())["runs"][0]["val_loss"] == runs["r1"]["val_loss"]
