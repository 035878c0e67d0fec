"""The real `rexmoe-train` CLI, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*overrides: str, timeout: int = 300, user_env: bool = False) -> subprocess.CompletedProcess:
    """``user_env``: without the suite's WANDB_MODE=disabled (tests/conftest.py), as a user's shell."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if user_env:
        env.pop("WANDB_MODE", None)
    return subprocess.run([sys.executable, "-m", "rexmoe_train.cli.train", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def train_here(capsys, *argv: str) -> tuple[int, list[str]]:
    """`rexmoe-train ARGV` in this process, for the cases that stop before anything is built."""
    from rexmoe_train.cli.train import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exit_:
        rc = exit_.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


BAD_OVERRIDES = [
    ("rexmoe.reuse_group_size=0", "rexmoe.reuse_group_size"),
    ("rexmoe.gating=softmax", "rexmoe.gating"),
    ("rexmoe=paper rexmoe.psr.end_step=10", "rexmoe.psr.end_step"),  # PSR on (the default has it off)
    ("+model.num_expert=4", "model.num_expert"),
    ("train.train_iters=99999999999999999999", "train.train_iters"),  # beyond int64 (issue 31)
    ("train.train_iters=9223372036854775807", "train.train_iters"),  # x global_batch_size overflows int64
]


@pytest.mark.parametrize("override,field", BAD_OVERRIDES, ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override_one_line_exit_2_nothing_written(tmp_path, capsys, override, field):
    run_dir = tmp_path / "run"
    rc, lines = train_here(capsys, *override.split(), f"run.dir={run_dir}")
    assert rc == 2 and len(lines) == 1 and field in lines[0], lines
    assert not run_dir.exists()


def test_bad_override_through_the_console_script(tmp_path):
    """The one subprocess case: the real process path prints the same one line and exits 2."""
    run_dir = tmp_path / "run"
    proc = run_cli("rexmoe.gating=softmax", f"run.dir={run_dir}", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "rexmoe.gating" in lines[0], proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("broken,line,needle", [
    ("train:\n  lr: 1\n  lr: 2\n", 3, "found duplicate key lr"),
    ("train: [1, 2\n", 2, "expected ',' or ']'"),
    ("x: \"\xff\"\n", 1, "not UTF-8"),
], ids=["duplicate-key", "unparsable", "not-utf8"])
def test_yaml_error_in_a_config_dir_is_one_line(tmp_path, capsys, monkeypatch, broken, line, needle):
    """Issue 31: a user's REXMOE_CONFIG_DIR with a bad YAML file ended in a 60-line traceback, exit 1.
    ``line``: where the problem is, counted from the end of the packaged config.yaml."""
    import shutil
    from importlib.resources import files

    mine = tmp_path / "configs"
    shutil.copytree(str(files("rexmoe_train.configs")), mine, ignore=shutil.ignore_patterns("__pycache__"))
    config = mine / "config.yaml"
    line += config.read_text().count("\n")
    config.write_bytes(config.read_bytes() + broken.encode("latin-1"))
    monkeypatch.setenv("REXMOE_CONFIG_DIR", str(mine))
    rc, lines = train_here(capsys, f"run.dir={tmp_path / 'run'}")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {config} line {line}: {needle}"), lines
    assert not (tmp_path / "run").exists()


def test_second_ctrl_c_line_says_what_a_rerun_starts_from(tmp_path):
    """Issue 31: 'rerun to resume from the last checkpoint' was printed when there was none."""
    from rexmoe_train.checkpoint import layout
    from rexmoe_train.cli.train import _resume_hint
    from rexmoe_train.config.compose import compose_experiment

    cfg = compose_experiment([f"run.dir={tmp_path / 'run'}"]).experiment
    assert _resume_hint(cfg) == "no checkpoint saved yet: a rerun starts from step 0"
    cfg.checkpoint.load = "/some/other/checkpoints"
    assert _resume_hint(cfg) == "no checkpoint saved yet: a rerun starts again from checkpoint.load=/some/other/checkpoints"
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    layout.replace_pointer(root, 7)
    assert _resume_hint(cfg) == f"rerun to resume from {root / 'iter_0000007'}"


@pytest.mark.slow  # a real end-to-end CLI run
def test_default_run_short_override_loss_falls(tmp_path):
    """The embedded default (tiny ReXMoE, r=4), shortened, with PSR turned on (the default preset has
    it off; on, it uses nested masks) and its ramp squeezed in."""
    run_dir = tmp_path / "run"
    proc = run_cli("train.train_iters=40", "train.eval_interval=20", "train.lr_warmup_iters=5",
                   "rexmoe.psr.schedule=linear", "rexmoe.psr.start_step=10", "rexmoe.psr.end_step=30", "run.progress=false",
                   f"run.dir={run_dir}", user_env=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for key in ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s",
                "psr_candidates", "load_violation_max", "group_load_violation_max",
                "under_used_fraction", "reuse_matrix", "group_max_share", "tflops_per_device", "mfu",
                "memory_gib", "z_loss", "load_balancing_loss", "skipped_steps"):
        assert all(key in r for r in steps), key
    assert len(steps[0]["load_violation_max"]) == 4
    assert all(r["tflops_per_device"] > 0 and r["memory_gib"] > 0 for r in steps)
    assert (run_dir / "wandb").is_dir()  # offline wandb by default
    # reuse matrix: one 4x4 matrix for the single group, each router's row a distribution over owners
    matrix = steps[-1]["reuse_matrix"][0]
    assert len(matrix) == 4 and all(abs(sum(row) - 1) < 1e-3 for row in matrix)
    # raw loads on evaluation steps: every router routed exactly tokens * top-k assignments
    loads = [r for r in steps if "expert_load" in r]
    assert [r["step"] for r in loads] == [20, 40]
    assert all(sum(row) == 8 * 256 * 2 for row in loads[-1]["expert_load"][0])
    # PSR: 8 candidates until step 10, then growing to 32 at step 30
    assert steps[9]["psr_candidates"] == 8 and steps[19]["psr_candidates"] == 20
    assert steps[39]["psr_candidates"] == 32
    first = sum(r["lm_loss"] for r in steps[:3]) / 3
    last = sum(r["lm_loss"] for r in steps[-3:]) / 3
    assert last < first - 1.5, (first, last)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0] - 1.5  # steps 0, 20, 40
    assert (run_dir / "config.yaml").exists() and (run_dir / "data.json").exists()
    model = json.loads((run_dir / "model.json").read_text())
    assert model["parameters_experts"] > 0


def test_dry_run_prints_layout_without_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("run.dry_run=true", "rexmoe.reuse_group_size=2", "parallel.expert_model_parallel_size=2",
                   "parallel.pipeline_model_parallel_size=2", f"run.dir={run_dir}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world size 4: tp=1 pp=2" in proc.stdout and "ep=2" in proc.stdout
    assert "stage 1 chunk 0: layers 3-4, reuse groups [1]" in proc.stdout
    assert "candidate    8 (owner +1, expert   0) -> rank 0, slot 4" in proc.stdout
    assert not run_dir.exists()


@pytest.mark.slow  # a real end-to-end CLI run
def test_rerun_of_a_finished_run_trains_nothing_and_says_so(tmp_path):
    """Running the same command again resumes at train.train_iters: no step, exit 0, no 'nan'."""
    run_dir = tmp_path / "run"
    small = ("train.train_iters=2", "train.lr_warmup_iters=1", "train.eval_iters=1", "model.hidden_size=64",
             "model.moe_ffn_hidden_size=64", "train.seq_length=32", "run.progress=false",
             "run.wandb.mode=disabled", f"run.dir={run_dir}")
    first = run_cli(*small)
    assert first.returncode == 0 and "final train loss" in first.stdout, first.stderr[-2000:]
    again = run_cli(*small)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[done] step 2; no step trained (already at train.train_iters)" in again.stdout
    assert "nan" not in again.stdout.lower()


@pytest.mark.parametrize("model, hidden", [("rexmoe_7b_se", 2048), ("rexmoe_2.3b_se", 512)])
def test_paper_dry_run_needs_only_the_model(model, hidden):
    """The paper configs carry their recipe (ep=8 ranks, global batch 512) and the 32k vocabulary."""
    proc = run_cli("run.dry_run=true", f"model={model}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world size 8:" in proc.stdout
    assert f"embeddings={2 * hidden * 32000:,}" in proc.stdout, proc.stdout[:2000]


@pytest.mark.slow  # a real end-to-end CLI run
def test_paper_literal_preset_trains(tmp_path):
    """`rexmoe=paper` is the paper's gate and PSR masking, one override away from the default."""
    import yaml

    run_dir = tmp_path / "run"
    proc = run_cli("rexmoe=paper", "train.train_iters=6", "train.lr_warmup_iters=1", "train.eval_iters=1",
                   "train.eval_interval=6", "model.hidden_size=64", "model.moe_ffn_hidden_size=64",
                   "train.seq_length=32", "rexmoe.psr.start_step=2", "rexmoe.psr.end_step=5", "run.progress=false",
                   "run.wandb.mode=disabled", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rexmoe = yaml.safe_load((run_dir / "config.yaml").read_text())["rexmoe"]
    assert (rexmoe["gating"], rexmoe["gate_normalization"]) == ("softmax_then_topk", "none")
    assert (rexmoe["psr"]["mask_draw"], rexmoe["psr"]["protect_local"]) == ("per_step", False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["psr_candidates"] for r in records if "loss" in r] == [8, 8, 16, 24, 32, 32]
    assert any("val_loss" in r and r["step"] == 6 for r in records)


def test_local_attention_warning_at_start_up_is_one_line_on_a_te_less_gpu(monkeypatch):
    """What rank 0 prints before building the model on a GPU without Transformer Engine (the GPU's
    memory given: this machine has none); nothing on the CPU path."""
    from rexmoe_train.cli.train import local_attention_memory_warning
    from rexmoe_train.config.compose import compose_experiment

    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it for the packaged ep 8 layout

    argv = ["model=rexmoe_2.3b"]
    experiment = compose_experiment(argv).experiment.validate()
    line = local_attention_memory_warning(experiment, argv, device_bytes=80 * 10 ** 9)
    assert line.startswith("[memory] warning:") and "rexmoe-plan model=rexmoe_2.3b --spec local" in line
    assert local_attention_memory_warning(experiment, argv) is None  # no CUDA here: the CPU path
    small = compose_experiment(["model=rexmoe_18.7b_se"]).experiment.validate()
    assert local_attention_memory_warning(small, [], device_bytes=80 * 10 ** 9) is None
