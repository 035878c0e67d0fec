"""Observability helpers: honest FLOP count, collapse alarm, wandb offline by default."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rexmoe_train.core.flops import flops_per_token, shape_from_experiment
from tests.helpers import tiny_config


def test_flops_count_active_experts_and_router_only():
    cfg = tiny_config(r=1, layers=4, experts=8, topk=2, hidden=64)
    base = flops_per_token(shape_from_experiment(cfg, 320), 1, 32)
    cfg8 = tiny_config(r=1, layers=4, experts=64, topk=2, hidden=64)
    more = flops_per_token(shape_from_experiment(cfg8, 320), 1, 32)
    # owning 8x more experts does not change the experts' compute per token, only the router's
    assert more["experts"] == base["experts"]
    assert more["router"] == 8 * base["router"]
    # reuse r=4: router width r*N, expert compute unchanged
    reused = flops_per_token(shape_from_experiment(cfg, 320), 4, 32)
    assert reused["experts"] == base["experts"] and reused["router"] == 4 * base["router"]
    # hand count of one expert MLP per token: SwiGLU 3 matmuls of 64x64 (moe_ffn 64), 2 FLOPs per MAC
    assert base["experts"] == 4 * 2 * 3 * 2 * 64 * 64


def test_collapse_alarm_needs_consecutive_intervals():
    from rexmoe_train.training.trainer import Trainer

    messages = []
    fake = SimpleNamespace(cfg=tiny_config(), _collapse_streak={},
                           logger=SimpleNamespace(message=messages.append))
    fake.cfg.run.collapse_share, fake.cfg.run.collapse_intervals = 0.5, 2
    shares = [[0.6, 0.1], [0.2, 0.7], [0.3, 0.8], [0.9, 0.9]]
    alarms = []
    for step, share in enumerate(shares, 1):
        record = {"step": step, "group_max_share": share}
        Trainer._watch_collapse(fake, record)
        alarms.append(record.get("collapse_alarm"))
    assert alarms == [None, None, [1], [1]]  # group 0's streak broke at step 2; group 1 hot from 2
    assert len(messages) == 2 and "group 1: 80%" in messages[0]


def test_wandb_offline_by_default_and_no_key_written(tmp_path, megatron_world, monkeypatch):
    from rexmoe_train.config.schema import ExperimentConfig
    from rexmoe_train.training.run_logger import RunLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite's own setting (tests/conftest.py)
    assert ExperimentConfig().run.wandb.mode == "offline"
    cfg = ExperimentConfig()
    logger = RunLogger(str(tmp_path / "run"), enabled=True, total_steps=2, progress=False,
                       wandb_cfg=cfg.run.wandb, resolved_config={"train": {"lr": 1.0}})
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    assert (tmp_path / "run" / "wandb").is_dir()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 2.5
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"api_key" not in path.read_bytes().lower(), path


def test_wandb_mode_defaults_to_the_wandb_mode_variable(monkeypatch):
    """WANDB_MODE (wandb's own variable, with its aliases) is the default; an explicit run.wandb.mode
    wins; a value wandb does not know is one line naming the variable."""
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.config.schema import ConfigError

    for value, mode in (("disabled", "disabled"), ("online", "online"), ("dryrun", "offline"), ("run", "online"),
                        ("", "offline")):
        monkeypatch.setenv("WANDB_MODE", value)
        assert compose_experiment([]).experiment.run.wandb.mode == mode, value
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_experiment(["run.wandb.mode=offline"]).experiment.run.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ConfigError, match=r"^config error: WANDB_MODE='cloud' \(the default of run.wandb.mode\): "
                                          r"must be one of disabled, offline, online"):
        compose_experiment([]).experiment.validate()
