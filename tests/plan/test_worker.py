"""The simulation worker: a failure in the fresh process comes back as one line."""

from __future__ import annotations

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.plan.simulate import SimSettings
from rexmoe_train.plan.worker import SimulationError, run_jobs


@pytest.mark.slow
def test_a_layout_the_world_does_not_divide_fails_in_one_line():
    cfg = compose_experiment(["parallel.expert_model_parallel_size=2"]).experiment
    with pytest.raises(SimulationError) as err:
        run_jobs(cfg, 3, [(0, SimSettings())])
    assert "\n" not in str(err.value) and "divisible" in str(err.value)
