"""Asynchronous checkpoints (checkpoint.async_save; rexmoe_train/checkpoint/manager.py): the pointer
moves only once every rank's files are written and digested, the checkpoint holds the state of the
step it was started at while training goes on, a SIGKILL during the background write resumes from
the previous checkpoint, and the final save is complete before exit 0. The 2-process case (digests
gathered from both ranks) runs in tests/resilience/test_elastic.py; the stall figures are a benchmark
(bench/async_save_bench.py, docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_trainer
from tests.training.test_checkpoint import REPO, TINY, cli, finish, losses, ramp_config


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in trainer.model.chunks for p in chunk.parameters()]


def test_async_save_is_finalized_only_when_written_and_holds_its_step(megatron_world, tmp_path):
    from rexmoe_train.checkpoint import iter_name, layout, read_metadata, read_tracker

    cfg = ramp_config(tmp_path / "run", train_iters=6, keep_last_n=None)
    assert cfg.checkpoint.async_save  # the default
    trainer = make_trainer(cfg)
    ck, root = trainer.checkpoints, layout.save_root(cfg)
    for _ in range(2):
        trainer.train_step()
    trainer.save_checkpoint(blocking=True)
    assert read_tracker(root) == 2 and ck.save_in_flight is None
    for _ in range(2):
        trainer.train_step()
    at_step_4 = _params(trainer)
    trainer.save_checkpoint()  # async: returns once the writer runs
    assert ck.save_in_flight == 4
    assert read_tracker(root) == 2 and not (root / iter_name(4)).exists() and (root / "iter_0000004.tmp").is_dir()
    trainer.train_step()  # training goes on while the step-4 files are written
    assert any(not torch.equal(a, b) for a, b in zip(at_step_4, _params(trainer)))
    assert read_tracker(root) == 2  # still: only finalize moves it
    assert ck.finalize(blocking=True)
    assert read_tracker(root) == 4 and ck.save_in_flight is None and not (root / "iter_0000004.tmp").exists()
    meta = read_metadata(root / iter_name(4))  # every digest (written by the writer process) re-verified
    assert meta["step"] == 4 and {"__0_0.distcp", ".metadata", "common.pt", "config.yaml"} <= set(meta["files"])
    step, blocked_s, total_s, polls_s = ck.save_times[-1]
    assert step == 4 and 0 < blocked_s and 0 < total_s and polls_s >= 0
    # the checkpoint holds step 4's weights (the writer's copy-on-write snapshot), not step 5's
    loaded = make_trainer(ramp_config(tmp_path / "load", train_iters=6, load=str(root / iter_name(4))))
    assert loaded.step == 4
    assert all(torch.equal(a, b) for a, b in zip(at_step_4, _params(loaded)))


def _cli_killed_in_writer(step: int, *overrides: str, log: Path) -> subprocess.Popen:
    """As tests/training/test_checkpoint.py::cli, through _async_fault_cli.py: the trainer is
    SIGKILLed by the shard writer of the save of ``step`` once that writer's files are written."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))}
    env["OMP_NUM_THREADS"] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    fault = Path(__file__).with_name("_async_fault_cli.py")
    proc = subprocess.Popen([sys.executable, str(fault), str(step), *TINY, *overrides], cwd=REPO, env=env,
                            stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"),
                            start_new_session=True)
    proc.log = log
    return proc


@pytest.mark.slow
def test_sigkill_during_async_write_resumes_from_previous_checkpoint(tmp_path):
    """Saves at 2, 4, 6 (async). Run A: straight, exit 0 with the final save complete. Run B: the
    trainer is SIGKILLed while the step-4 shards are being written: the pointer names step 2; the
    same command resumes from step 2 and trains steps 3-6 bitwise as run A did."""
    from rexmoe_train.checkpoint import TRACKER, iter_name, read_metadata, read_tracker

    common = ["train.train_iters=6", "checkpoint.save_interval=2", "checkpoint.async_save=true"]
    straight = cli(*common, f"run.dir={tmp_path / 'straight'}", log=tmp_path / "logs" / "straight")
    killed = _cli_killed_in_writer(4, *common, f"run.dir={tmp_path / 'killed'}", log=tmp_path / "logs" / "killed")
    rc, out, err = finish(killed)
    assert rc == -signal.SIGKILL, err[-3000:]
    root = tmp_path / "killed" / "checkpoints"
    assert read_tracker(root) == 2 and not (root / iter_name(4)).exists()
    assert read_metadata(root / iter_name(2))["step"] == 2
    assert "saved step 2" in out + err and "saved step 4" not in out + err

    rc, out, err = finish(cli(*common, f"run.dir={tmp_path / 'killed'}", log=tmp_path / "logs" / "resumed"))
    assert rc == 0, err[-3000:]
    assert f"resumed from {root / iter_name(2)} at step 2" in out + err
    assert sorted(p.name for p in root.iterdir()) == [iter_name(2), iter_name(4), iter_name(6), TRACKER]
    assert read_tracker(root) == 6 and read_metadata(root / iter_name(6))["step"] == 6

    rc, out, err = finish(straight)
    assert rc == 0, err[-3000:]
    text = out + err
    # the final save (async at its interval) is finalized before the run ends and exits 0
    assert text.index("saved step 6") < text.index("[done]")
    assert read_tracker(tmp_path / "straight" / "checkpoints") == 6
    read_metadata(tmp_path / "straight" / "checkpoints" / iter_name(6))
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    assert got == ref  # bitwise: steps 1-2 of the killed run, 3-6 of the resumed one


def test_a_failed_commit_raises_where_the_save_is_waited_on_and_only_there(megatron_world, tmp_path):
    """The async machinery (rexmoe_train/checkpoint/async_save.py): the save's handle carries its
    failure; finalize() raises it once, where the save is waited on, and the save is over (nothing in
    flight, the previous checkpoint and pointer untouched, the .tmp removed)."""
    from rexmoe_train.checkpoint import CheckpointError, faults, layout, read_tracker

    cfg = ramp_config(tmp_path / "run", train_iters=6, keep_last_n=None)
    trainer = make_trainer(cfg)
    ck, root = trainer.checkpoints, layout.save_root(cfg)
    trainer.train_step()
    trainer.save_checkpoint(blocking=True)

    def disk_gone(point: str, step: int) -> None:
        if point == "after_meta" and step == 2:
            raise OSError(28, "No space left on device", str(root))

    faults.set_fault_hook(disk_gone)
    try:
        trainer.train_step()
        trainer.save_checkpoint()  # async: the write starts; the commit fails later
        assert ck.save_in_flight == 2
        with pytest.raises(CheckpointError, match=r"saving step 2 failed: .*\[ENOSPC\].*previous checkpoint \(step 1\)"):
            ck.finalize(blocking=True)
    finally:
        faults.set_fault_hook(None)
    assert ck.save_in_flight is None and ck.finalize(blocking=True)  # raised once, not again
    assert read_tracker(root) == 1 and not (root / "iter_0000002.tmp").exists()
    # a blocking save's failed commit raises from save() itself
    faults.set_fault_hook(disk_gone)
    try:
        with pytest.raises(CheckpointError, match="saving step 2 failed"):
            trainer.save_checkpoint(blocking=True)
    finally:
        faults.set_fault_hook(None)
    assert ck.save_in_flight is None and read_tracker(root) == 1
