"""The launch scripts: syntax, and a real 2-process run through launch/torchrun.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/slurm.sbatch"])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_torchrun_sh_bad_nproc_one_line():
    proc = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), "zero"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_two_process_expert_parallel_run(tmp_path):
    # no OMP_NUM_THREADS: the launcher splits the cores, the trainer redoes that choice and says so
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    run_dir = tmp_path / "run"

    def launch(steps: int) -> subprocess.CompletedProcess:
        # a 3-step smoke run needs no warm-up override (its default is min(20, train_iters // 10))
        return subprocess.run(
            ["bash", str(REPO / "launch/torchrun.sh"), "2", f"train.train_iters={steps}",
             # the test model's shapes: what is checked is the launcher, not the model
             "model.hidden_size=64", "model.moe_ffn_hidden_size=64", "train.seq_length=32",
             "train.micro_batch_size=1", "train.global_batch_size=4", "train.eval_iters=1",
             "train.eval_interval=3", "parallel.expert_model_parallel_size=2", "run.progress=false",
             f"run.dir={run_dir}", f"checkpoint.save={tmp_path / 'ckpt'}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    proc = launch(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    threads = [line for line in proc.stdout.splitlines() if line.startswith("[threads]")]
    assert len(threads) == 1 and "/ 2 processes on this node" in threads[0], proc.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # resuming (the checkpoint load is where megatron/torch deprecation warnings came from) is quiet
    proc = launch(4)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((run_dir / "model.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("overrides, needle", [
    (["rexmoe.gating=softmax"], "config error: rexmoe.gating='softmax'"),
    (["train.lrr=1"], "config error: unknown field 'train.lrr'"),
    (["model=nope"], "config error: model='nope': must be one of"),
    (["parallel.expert_model_parallel_size=3"], "parallel.expert_model_parallel_size=3"),
    (["train.global_batch_size=6", "train.micro_batch_size=2"], "train.global_batch_size=6"),  # layout, 2 ranks
])
def test_torchrun_sh_config_error_is_one_line_exit_2(overrides, needle):
    """Checked once before torchrun starts: no per-rank copies, no ChildFailedError report."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), "2", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], lines
