"""recipes/ablation_tiny/run.py: every variant composes and validates; a real two-seed smoke run of two
variants produces the table with per-seed deltas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import script_module

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "ablation_tiny" / "run.py"


def _recipe():
    with script_module(SCRIPT, "ablation_tiny_run") as module:
        return module


def _gate_function(rexmoe) -> str:
    """The function the gate computes: the paper's gating with its kept gates renormalised is
    topk_then_softmax (the same k softmax values), so either is compared with the same vanilla."""
    if rexmoe.gating == "softmax_then_topk" and rexmoe.gate_normalization == "renorm_topk":
        return "topk_then_softmax"
    return rexmoe.gating if rexmoe.gate_normalization == "none" else f"{rexmoe.gating}+{rexmoe.gate_normalization}"


def test_psr_ramp_is_a_fraction_of_the_run():
    recipe = _recipe()
    by_name = {v.name: v for v in recipe.VARIANTS}
    assert recipe.psr_steps(by_name["x_renorm_nested"], 150) == ["rexmoe.psr.start_step=30", "rexmoe.psr.end_step=90"]
    assert recipe.psr_steps(by_name["x_renorm_nested_early"], 250) == [
        "rexmoe.psr.start_step=0", "rexmoe.psr.end_step=75"]
    assert recipe.psr_steps(by_name["x_renorm_nested_early"], 2) == [
        "rexmoe.psr.start_step=0", "rexmoe.psr.end_step=1"]  # end > start, always


def test_every_variant_is_a_valid_config_and_vanilla_baselines_exist():
    from rexmoe_train.config.compose import compose_experiment

    recipe = _recipe()
    names = {v.name for v in recipe.VARIANTS}
    for v in recipe.VARIANTS:
        cfg = compose_experiment([*v.overrides, "run.dir=unused"]).experiment.validate()
        assert cfg.rexmoe.reuse_group_size == v.reuse
        assert v.baseline in names and next(b for b in recipe.VARIANTS if b.name == v.baseline).reuse == 1
        baseline = compose_experiment([*next(b for b in recipe.VARIANTS if b.name == v.baseline).overrides])
        # the same gating as its vanilla, or (x_renorm_*) the same gate function
        assert (cfg.rexmoe.gating == baseline.experiment.rexmoe.gating
                or _gate_function(cfg.rexmoe) == _gate_function(baseline.experiment.rexmoe)), v.name
        # every variant pins the gate and the PSR masking: the packaged default never leaks into one
        assert {o.split("=")[0] for o in v.overrides} >= {
            "rexmoe.gating", "rexmoe.gate_normalization", "rexmoe.psr.schedule", "rexmoe.psr.protect_local",
            "rexmoe.psr.mask_draw"}, v.name
    bias = compose_experiment(list(next(v for v in recipe.VARIANTS if v.name == "r4_bias_physical").overrides))
    assert bias.experiment.rexmoe.balance.expert_bias_scope == "physical"
    assert bias.experiment.rexmoe.balance.layer_aux_coeff == 0.0


def test_bad_arguments_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "r9"], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--only 'r9': allowed values are r1" in lines[0]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "recipes/ablation_tiny/run.py: error: --jobs 0: must be >= 1"]


@pytest.mark.slow
def test_two_seed_smoke_run(tmp_path):
    out = tmp_path / "grid"
    tiny = ["model.hidden_size=64", "model.moe_ffn_hidden_size=64", "train.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr_warmup_iters=1"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *tiny, "--out", str(out), "--steps", "5",
                           "--eval-iters", "1", "--seeds", "1", "2", "--only", "r1", "r4_bias_physical", "--jobs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in result["variants"]}
    assert set(rows) == {"r1", "r4_bias_physical"} and result["seeds"] == [1, 2]
    runs = rows["r4_bias_physical"]["runs"]
    deltas = rows["r4_bias_physical"]["delta_vs_baseline"]
    assert deltas == pytest.approx([runs[i]["val_loss"] - rows["r1"]["runs"][i]["val_loss"] for i in range(2)])
    assert rows["r1"]["runs"][0]["val_loss"] != rows["r1"]["runs"][1]["val_loss"]  # the seed matters
    assert "| r=4, aux-free bias, scope physical |" in (out / "results.md").read_text()


def test_overrides_may_follow_a_list_option():
    """`--only r1 r4_t2s data.source=indexed`: the override is not taken for a variant name."""
    recipe = _recipe()
    args, extra = recipe.parse(["--only", "r1", "r4_t2s", "data.split=80,20,0", "--seeds", "1", "train.lr=0.01"])
    assert args.only == ["r1", "r4_t2s"] and args.seeds == [1]
    assert extra == ["data.split=80,20,0", "train.lr=0.01"]


def test_reuse_factor_survives_a_model_config_that_says_r1():
    """model=paper_small sets rexmoe.reuse_group_size=1 in its YAML; an r=4 variant must still be r=4
    (the first paper_small runs of this recipe silently trained vanilla)."""
    from rexmoe_train.config.compose import compose_experiment

    recipe = _recipe()
    configs = REPO / "recipes" / "paper_small" / "configs"
    for v in recipe.VARIANTS:
        cfg = compose_experiment([f"hydra.searchpath=[file://{configs}]", "model=paper_small",
                                  "train=paper_small", *v.overrides]).experiment
        assert cfg.rexmoe.reuse_group_size == v.reuse == (1 if v.name.startswith("r1") else 4), v.name
