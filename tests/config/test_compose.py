"""Composition of the packaged configs: defaults from the dataclasses, YAML differences, one-line
errors, the config-dir override and the run directory each configuration gets."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from importlib.resources import files

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.config.schema import ConfigError, ExperimentConfig

PACKAGED = files("rexmoe_train.configs")


def test_default_is_the_tiny_run_and_every_unset_field_is_the_dataclass_default():
    composed = compose_experiment([])
    cfg = composed.experiment
    assert composed.choices == {"model": "tiny", "train": "tiny_cpu", "rexmoe": "default"}
    assert cfg.run.dir == "runs/tiny-r4"
    assert cfg.rexmoe.reuse_group_size == 4 and (cfg.rexmoe.psr.start_step, cfg.rexmoe.psr.end_step) == (50, 150)
    assert cfg.model.num_query_groups == 2
    # nothing else set by YAML: the rest equals the dataclasses' defaults
    defaults = ExperimentConfig()
    assert cfg.train == defaults.train and cfg.parallel == defaults.parallel and cfg.data == defaults.data
    assert dataclasses.replace(cfg.model, num_query_groups=None) == defaults.model


def test_se_variants_extend_their_base_and_paper_models_bring_their_recipe():
    base = compose_experiment(["model=rexmoe_2.3b"]).experiment
    se = compose_experiment(["model=rexmoe_2.3b_se"]).experiment
    assert (se.model.moe_router_topk, se.model.moe_shared_expert_intermediate_size) == (6, 1488)
    assert dataclasses.replace(se.model, moe_router_topk=8, moe_shared_expert_intermediate_size=None) == base.model
    assert se.train.seq_length == 4096 and se.train.global_batch_size == 512  # train=paper selected
    assert se.model.vocab_size == 32000 and se.parallel.expert_model_parallel_size == 8
    # the command line still picks another recipe
    assert compose_experiment(["model=rexmoe_2.3b", "train=tiny_cpu"]).experiment.train.seq_length == 256


# the reuse setting of the packaged default (configs/rexmoe/default.yaml; docs/ablation_tiny.md section 6)
# and of the paper-literal preset, which is also what the dataclasses default to
DEFAULT_GATE_AND_MASKS = {"gating": "softmax_then_topk", "gate_normalization": "renorm_topk", "psr.schedule": "none",
                          "psr.mask_on": "scores", "psr.mask_draw": "nested", "psr.protect_local": False}
PAPER_GATE_AND_MASKS = {"gating": "softmax_then_topk", "gate_normalization": "none", "psr.schedule": "linear",
                        "psr.mask_on": "scores", "psr.mask_draw": "per_step", "psr.protect_local": False}


def _gate_and_masks(rexmoe) -> dict:
    return {key: getattr(rexmoe.psr, key[4:]) if key.startswith("psr.") else getattr(rexmoe, key)
            for key in DEFAULT_GATE_AND_MASKS}


@pytest.mark.parametrize("model", ["tiny", "rexmoe_0.5b", "rexmoe_0.5b_se", "rexmoe_2.3b", "rexmoe_2.3b_se",
                                   "rexmoe_7b_se", "rexmoe_18.7b_se"])
def test_every_model_gets_the_default_preset_and_rexmoe_paper_is_the_paper(model):
    default = compose_experiment([f"model={model}"]).experiment
    paper = compose_experiment([f"model={model}", "rexmoe=paper"]).experiment
    assert _gate_and_masks(default.rexmoe) == DEFAULT_GATE_AND_MASKS
    assert _gate_and_masks(paper.rexmoe) == PAPER_GATE_AND_MASKS == _gate_and_masks(ExperimentConfig().rexmoe)
    # the presets change the gate, PSR on/off and the masking only: the model's reuse and PSR steps stay
    same = dataclasses.replace(paper.rexmoe, gate_normalization=default.rexmoe.gate_normalization,
                               psr=dataclasses.replace(paper.rexmoe.psr, mask_draw=default.rexmoe.psr.mask_draw,
                                                       schedule=default.rexmoe.psr.schedule))
    assert same == default.rexmoe and dataclasses.replace(paper, rexmoe=same, run=default.run) == default
    assert paper.rexmoe.psr.end_step > paper.rexmoe.psr.start_step  # the model's ramp, used by rexmoe=paper
    paper.validate()
    # an explicit field still wins over the preset
    psr_on = compose_experiment([f"model={model}", "rexmoe.psr.schedule=linear"]).experiment.rexmoe.psr
    assert (psr_on.schedule, psr_on.mask_draw, psr_on.start_step) == ("linear", "nested", paper.rexmoe.psr.start_step)


@pytest.mark.parametrize("model", ["rexmoe_0.5b", "rexmoe_0.5b_se", "rexmoe_2.3b_se", "rexmoe_7b_se"])
def test_paper_models_validate_for_their_8_ranks(model):
    compose_experiment([f"model={model}"]).experiment.validate(world_size=8)


@pytest.mark.parametrize("overrides, line", [
    (["train.lrr=1"], "config error: unknown field 'train.lrr'; allowed: adam_beta1,"),
    (["+foo=1"], "config error: unknown field 'foo'; allowed: checkpoint, data, model,"),
    (["model=nope"], "config error: model='nope': must be one of rexmoe_0.5b,"),
    (["train.lr=fast"], "config error: train.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (["train.lr"], "config error: Error parsing override 'train.lr'"),
])
def test_composition_errors_are_one_line(overrides, line):
    with pytest.raises(ConfigError) as err:
        compose_experiment(overrides)
    assert "\n" not in str(err.value) and str(err.value).startswith(line), str(err.value)


def test_run_dir_is_distinct_per_configuration_and_stable():
    names = {tuple(o): compose_experiment(o).experiment.run.dir for o in (
        [], ["run.progress=false"], ["rexmoe.psr.schedule=cosine", "rexmoe.psr.end_step=200"],
        ["rexmoe.psr.end_step=200", "rexmoe.psr.schedule=cosine"], ["parallel.expert_model_parallel_size=2"],
        ["rexmoe.reuse_group_size=1"], ["model=rexmoe_2.3b"], ["model=rexmoe_2.3b", "train=paper"])}
    assert names[()] == names[("run.progress=false",)] == "runs/tiny-r4"  # run.* is not a setting
    cosine = names[("rexmoe.psr.schedule=cosine", "rexmoe.psr.end_step=200")]
    assert cosine.startswith("runs/tiny-r4-") and cosine == names[("rexmoe.psr.end_step=200", "rexmoe.psr.schedule=cosine")]
    assert names[("parallel.expert_model_parallel_size=2",)] not in (cosine, "runs/tiny-r4")
    assert names[("rexmoe.reuse_group_size=1",)].startswith("runs/tiny-r1-")
    assert names[("model=rexmoe_2.3b",)] == names[("model=rexmoe_2.3b", "train=paper")] == "runs/rexmoe_2.3b-r4"
    assert compose_experiment(["run.dir=/tmp/mine"]).experiment.run.dir == "/tmp/mine"


def test_config_dir_override(tmp_path, monkeypatch):
    mine = tmp_path / "configs"
    shutil.copytree(str(PACKAGED), mine, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (mine / "model" / "wide.yaml").write_text("# @package _global_\nmodel:\n  hidden_size: 256\n")
    monkeypatch.setenv("REXMOE_CONFIG_DIR", str(mine))
    assert compose_experiment(["model=wide"]).experiment.model.hidden_size == 256
    monkeypatch.setenv("REXMOE_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"REXMOE_CONFIG_DIR=.*must be a directory holding config.yaml"):
        compose_experiment([])


def test_configs_are_found_through_the_package_from_any_directory(tmp_path):
    code = ("from rexmoe_train.config.compose import compose_experiment\n"
            "print(compose_experiment(['model=rexmoe_7b_se']).experiment.model.hidden_size)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2048", proc.stderr[-2000:]


def test_model_from_a_search_path_gets_its_run_dir(tmp_path):
    """A model config found through hydra.searchpath (as the recipes pass theirs) composes without
    run.dir: the run-dir default composes the model's base with the same search path."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("# @package _global_\nmodel:\n  num_layers: 2\n"
                                                 "rexmoe:\n  reuse_group_size: 2\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose_experiment([search, "model=mine"]).experiment
    assert cfg.model.num_layers == 2 and cfg.run.dir == "runs/mine-r2"
    assert compose_experiment([search, "model=mine", "rexmoe.reuse_group_size=1"]).experiment.run.dir.startswith(
        "runs/mine-r1-")


def test_yaml_errors_in_a_config_dir_name_the_file_and_line(tmp_path):
    """Issue 31: a duplicate key or a syntax error in a user's config dir was a 60-line traceback."""
    mine = tmp_path / "configs"
    shutil.copytree(str(PACKAGED), mine, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (mine / "model" / "dup.yaml").write_text("# @package _global_\nmodel:\n  hidden_size: 64\n  hidden_size: 128\n")
    (mine / "model" / "bad.yaml").write_text("# @package _global_\nmodel: {hidden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        compose_experiment(["model=dup"], config_dir=str(mine))
    assert str(err.value) == (f"config error: {mine / 'model' / 'dup.yaml'} line 4: found duplicate key "
                              "hidden_size (while constructing a mapping)")
    with pytest.raises(ConfigError) as err:
        compose_experiment(["model=bad"], config_dir=str(mine))
    assert str(err.value).startswith(f"config error: {mine / 'model' / 'bad.yaml'} line 3: ")
    assert "\n" not in str(err.value)
