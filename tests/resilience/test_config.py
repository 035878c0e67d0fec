"""The resilience: block (config/schema.py ResilienceConfig): bad values are one line naming the field;
the CLI accepts overrides; the packaged config saves every 100 steps."""

from __future__ import annotations

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.config.schema import ConfigError


@pytest.mark.parametrize("override, needle", [
    ("resilience.train_timeout_s=0", "config error: resilience.train_timeout_s=0.0: must be > 0"),
    ("resilience.init_timeout_s=-1", "config error: resilience.init_timeout_s=-1.0: must be > 0"),
    ("resilience.step_timeout_s=0", "config error: resilience.step_timeout_s=0.0: must be > 0"),
    ("resilience.save_timeout_s=nan", "config error: resilience.save_timeout_s=nan: must be a finite number"),
    ("resilience.straggler_threshold=0", "config error: resilience.straggler_threshold=0.0: must be > 0"),
    ("resilience.straggler_intervals=0", "config error: resilience.straggler_intervals=0: must be >= 1"),
    ("resilience.straggler_min_excess_s=-0.1", "config error: resilience.straggler_min_excess_s=-0.1: must be >= 0.0"),
    ("resilience.straggler_report=maybe", "config error: resilience.straggler_report: Value 'maybe' is not a valid bool"),
    ("resilience.watchdog=1", "config error: unknown field 'resilience.watchdog'"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        compose_experiment([override]).experiment.validate()
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_defaults_overrides_and_the_packaged_save_interval():
    experiment = compose_experiment(["resilience.step_timeout_s=null", "resilience.train_timeout_s=60",
                                     "resilience.eval_timeout_s=50"]).experiment
    res = experiment.validate().resilience
    assert res.step_timeout_s is None and res.train_timeout_s == 60.0 and res.init_timeout_s == 900.0
    assert res.eval_timeout_s == 50.0 and res.save_timeout_s == 1800.0 and res.straggler_report
    assert res.first_step_timeout_s == 840.0 and res.save_collective_timeout_s == 2400.0
    assert experiment.checkpoint.save_interval == 100


def test_the_default_ladder_holds_every_budget_below_its_live_collective_timeout():
    res = compose_experiment([]).experiment.validate().resilience
    for budget, timeout in res.ladder():
        assert getattr(res, budget) < getattr(res, timeout), (budget, timeout)
    # the defects: the save budget above the training timeout is now under the raised save
    # timeout; the first step's budget no longer equals the start-up timeout (they raced)
    assert res.save_timeout_s > res.train_timeout_s and ("save_timeout_s", "save_collective_timeout_s") in res.ladder()
    assert res.first_step_timeout_s < res.init_timeout_s


@pytest.mark.parametrize("overrides, needle", [
    (["resilience.step_timeout_s=600"], "resilience.step_timeout_s=600.0 must be below resilience.train_timeout_s=600.0"),
    (["resilience.train_timeout_s=60", "resilience.step_timeout_s=50"],
     "resilience.eval_timeout_s=300.0 must be below resilience.train_timeout_s=60.0"),
    (["resilience.save_collective_timeout_s=1800"],
     "resilience.save_timeout_s=1800.0 must be below resilience.save_collective_timeout_s=1800.0"),
    (["resilience.first_step_timeout_s=900"],
     "resilience.first_step_timeout_s=900.0 must be below resilience.init_timeout_s=900.0"),
    (["resilience.init_timeout_s=200"], "resilience.first_step_timeout_s=840.0 must be below resilience.init_timeout_s=200.0"),
    (["resilience.init_timeout_s=200", "resilience.first_step_timeout_s=100"],
     "resilience.step_timeout_s=300.0 must be below resilience.init_timeout_s=200.0"),
])
def test_an_inconsistent_ladder_is_refused_in_one_line_naming_both_fields(overrides, needle):
    with pytest.raises(ConfigError) as err:
        compose_experiment(overrides).experiment.validate()
    assert str(err.value).startswith("config error: " + needle) and "\n" not in str(err.value)
    # turning a budget off takes it out of the ladder
    compose_experiment([*overrides, "resilience.step_timeout_s=null", "resilience.eval_timeout_s=null",
                        "resilience.save_timeout_s=null", "resilience.first_step_timeout_s=1",
                        "resilience.init_timeout_s=2"]).experiment.validate()


def test_the_cli_exits_2_on_an_inconsistent_ladder(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rexmoe_train.cli.train", f"run.dir={tmp_path}",
                          "resilience.save_timeout_s=3000"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resilience.save_timeout_s=3000.0 must be below resilience.save_collective_timeout_s" in lines[0]
