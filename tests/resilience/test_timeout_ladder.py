"""The timeout ladder in the Trainer (training/trainer.py, docs/reliability.md): a save and the wait for
an async save run inside the save watchdog section, under the raised save collective timeout, which is
set back after; the start-up budget ends with the first step. (The config's refusals:
tests/resilience/test_config.py.)"""

from __future__ import annotations

from tests.helpers import make_trainer
from tests.training.test_checkpoint import ramp_config


def test_saves_and_finalize_waits_run_in_the_save_section_under_the_raised_timeout(megatron_world, tmp_path,
                                                                                 monkeypatch):
    from rexmoe_train.training import trainer as trainer_module

    cfg = ramp_config(tmp_path / "run", train_iters=4, keep_last_n=None)
    res = cfg.resilience
    trainer = make_trainer(cfg)
    timeouts: list[float] = []
    monkeypatch.setattr(trainer_module, "set_collective_timeout", lambda s: timeouts.append(s) or 1)
    seen = []  # (what, watchdog section, the collective timeout then)
    ck = trainer.checkpoints
    real_save, real_finalize = ck.save, ck.finalize

    def save(*args, **kwargs):
        seen.append(("save", trainer.watchdog._current[0], timeouts[-1]))
        return real_save(*args, **kwargs)

    def finalize(blocking=False):
        if blocking or ck.save_in_flight is not None:
            seen.append((f"finalize(blocking={blocking})", trainer.watchdog._current[0], timeouts[-1]))
        return real_finalize(blocking=blocking)

    monkeypatch.setattr(ck, "save", save)
    monkeypatch.setattr(ck, "finalize", finalize)
    trainer._one_step([])  # the first step: start-up ends, collectives get the training timeout
    assert timeouts == [res.train_timeout_s] and not trainer.watchdog._starting
    trainer.save_checkpoint()  # async
    trainer._finish_saves()  # the blocking wait (end of run, halt)
    for _what, section, timeout in seen:
        assert section == "save" and timeout == res.save_collective_timeout_s, seen
    assert [what for what, _, _ in seen][:2] == ["save", "finalize(blocking=True)"]
    assert "finalize(blocking=True)" in [what for what, _, _ in seen[1:]]
    assert timeouts[-1] == res.train_timeout_s  # set back after the save
    assert ck.save_in_flight is None
