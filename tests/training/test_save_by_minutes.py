"""checkpoint.save_interval_minutes: a save at the first step boundary after that many minutes since the
last save, by rank 0's clock (agreed in the step's one all_reduce), or by save_interval steps, whichever
comes first."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ConfigError
from rexmoe_train.training import guard


def _saved_steps(root) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.name.startswith("iter_"))


def test_the_time_flag_rides_on_the_step_collective(megatron_world):
    signals = guard.StopSignals(True, None, 0.0)
    assert guard.step_flags(False, signals, save_due=True) == (False, False, False) and signals.agreed_save_due
    assert guard.step_flags(False, signals) == (False, False, False) and not signals.agreed_save_due


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_a_bad_interval_is_one_config_error(value):
    from tests.helpers import tiny_config

    cfg = tiny_config(r=2, layers=2)
    cfg.checkpoint.save_interval_minutes = value
    with pytest.raises(ConfigError, match="checkpoint.save_interval_minutes"):
        cfg.validate()


def test_minutes_or_steps_whichever_comes_first(megatron_world, tmp_path):
    """A 6-step run with save_interval=4: with a clock that says 5 minutes passed at steps 2 and 3
    (save_interval_minutes=4), saves land at 2 (minutes), 4 (steps: the clock was reset at 2), 6 (end);
    step 3's clock counts from the step-2 save, so no save there."""
    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(r=2, layers=2)
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 6, 100, 1
    cfg.run.dir, cfg.run.progress, cfg.run.wandb.mode = str(tmp_path / "run"), False, "disabled"
    ck = cfg.checkpoint
    ck.async_save, ck.keep_last_n, ck.save_interval, ck.save_interval_minutes = False, None, 4, 4.0
    trainer = make_trainer(cfg)
    clock = {"now": 0.0}
    trainer.save_clock = lambda: clock["now"]  # this trainer's save clock only (not the watchdog's)
    trainer._last_save_clock = 0.0
    real_step = trainer.train_step

    def step_with_clock():
        clock["now"] = {1: 60.0, 2: 300.0, 3: 420.0, 4: 480.0, 5: 500.0, 6: 510.0}[trainer.step + 1]
        return real_step()

    trainer.train_step = step_with_clock
    trainer.run()
    assert _saved_steps(tmp_path / "run" / "checkpoints") == [2, 4, 6]
