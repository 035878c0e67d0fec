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
    experiment = compose_experiment(["resilience.step_timeout_s=null", "resilience.train_timeout_s=60"]).experiment
    res = experiment.validate().resilience
    assert res.step_timeout_s is None and res.train_timeout_s == 60.0 and res.init_timeout_s == 900.0
    assert res.eval_timeout_s == 300.0 and res.save_timeout_s == 1800.0 and res.straggler_report
    assert experiment.checkpoint.save_interval == 100
