"""Attacks on a trained tiny checkpoint (tests/training/test_checkpoint.py's fixtures) and the resume
semantics, in process: code hidden in ``.metadata``, same-size damage, torch's BaseException on load,
an older checkpoint loaded, changed fields on resume, a run that never trains."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from rexmoe_train.checkpoint import layout
from tests.helpers import make_trainer
from tests.training.test_checkpoint import ramp_config, snapshot


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def _plant(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the checkpoint whose .metadata is a pickle that runs code when loaded."""
    ckpt_root = tmp_path / "ckpt"
    shutil.copytree(root, ckpt_root)
    iter_dir = ckpt_root / layout.iter_name(layout.read_tracker(ckpt_root))
    marker = tmp_path / "EXECUTED"
    size = (iter_dir / ".metadata").stat().st_size
    payload = pickle.dumps(_Payload(marker))  # padded to the same size: unpickling stops at STOP
    (iter_dir / ".metadata").write_bytes(payload + bytes(size - len(payload)))
    return iter_dir, marker


def _entry_points(iter_dir: Path, tmp_path: Path) -> list[tuple[str, int, str]]:
    """Load ``iter_dir`` through training (the manager's rank-0 checks), rexmoe-eval and rexmoe-convert."""
    from rexmoe_train.checkpoint import CheckpointError, compatibility
    from rexmoe_train.cli import convert
    from rexmoe_train.cli import eval as eval_cli

    out = []
    cfg = ramp_config(tmp_path / "run", train_iters=2, load=str(iter_dir))
    try:
        compatibility.validate_for_load(cfg, iter_dir, 256, 1, optimizer_chain=2)
        out.append(("train", 0, ""))
    except CheckpointError as err:
        out.append(("train", 2, str(err)))
    for name, main, argv in (("eval", eval_cli.main, [str(iter_dir), "--batches", "1"]),
                             ("convert", convert.main, ["export-hf", str(iter_dir), str(tmp_path / "hf")])):
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        out.append((name, rc, err.getvalue().strip()))
    return out


def test_crafted_metadata_really_runs_code_when_unpickled(saved_checkpoint, tmp_path):
    """The control: the attack is real (torch's reader unpickles .metadata), so the tests below can fail."""
    from torch.distributed.checkpoint import FileSystemReader

    iter_dir, marker = _plant(saved_checkpoint[0], tmp_path)
    try:
        FileSystemReader(str(iter_dir)).read_metadata()
    except Exception:  # noqa: BLE001 - the payload returns None, not a Metadata: what counts is the marker
        pass
    assert marker.exists()


@pytest.mark.parametrize("attack", ["unchanged manifest, no key", "re-digested manifest, key set",
                                    "manifest signed with another key"])
def test_crafted_metadata_never_executes(saved_checkpoint, tmp_path, monkeypatch, attack):
    iter_dir, marker = _plant(saved_checkpoint[0], tmp_path)
    meta = json.loads((iter_dir / layout.META).read_text())
    if attack == "unchanged manifest, no key":
        monkeypatch.delenv(layout.KEY_ENV, raising=False)
        needle = ".metadata does not match its blake3 digest"
    else:  # the attacker rewrites the digests (and signs with a key of their own)
        if attack == "manifest signed with another key":
            monkeypatch.setenv(layout.KEY_ENV, "attacker")
        layout.write_manifest(iter_dir, meta)
        monkeypatch.setenv(layout.KEY_ENV, "the-owners-key")
        needle = "not signed" if attack.startswith("re-digested") else "signature does not match"
    for name, rc, message in _entry_points(iter_dir, tmp_path):
        assert rc == 2 and needle in message and "\n" not in message, (name, message)
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()


def _flip_inside_shard(iter_dir: Path) -> None:
    shard = max(iter_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        block = f.read(4096)
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in block))  # 4 KB overwritten, same size


def test_same_size_damage_refused_through_the_trainer(megatron_world, saved_checkpoint, tmp_path):
    from rexmoe_train.checkpoint import CheckpointError

    root = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint[0], root)
    _flip_inside_shard(root / "iter_0000002")
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=r"iter_0000002 is damaged: __0_\d.distcp does not match") as err:
        make_trainer(ramp_config(tmp_path / "run", train_iters=3, load=str(root)))
    assert "\n" not in str(err.value) and snapshot(root) == before and not (tmp_path / "run").exists()


def test_torch_checkpoint_exception_is_one_line(megatron_world, saved_checkpoint, tmp_path):
    """A checkpoint without digests (format 1, written before them): a zero-filled .metadata reaches
    torch, whose CheckpointException derives from BaseException; still one CheckpointError line."""
    from rexmoe_train.checkpoint import CheckpointError

    root = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint[0], root)
    iter_dir = root / "iter_0000002"
    meta = json.loads((iter_dir / layout.META).read_text())
    meta["format"], meta["files"] = 1, {k: v["size"] for k, v in meta["files"].items()}
    (iter_dir / layout.META).write_text(json.dumps(meta))
    size = (iter_dir / ".metadata").stat().st_size
    (iter_dir / ".metadata").write_bytes(bytes(size))
    with pytest.raises(CheckpointError, match="could not be loaded") as err:
        make_trainer(ramp_config(tmp_path / "run", train_iters=3, load=str(root)))
    assert "\n" not in str(err.value)


def test_older_checkpoint_loaded_writes_the_final_step_again(megatron_world, tmp_path, monkeypatch):
    """iter_4 damaged, pointer at 4: loading iter_3 and training step 4 must write step 4 (the old rule
    skipped it because the pointer and the dir already said 4). Signed throughout."""
    monkeypatch.setenv(layout.KEY_ENV, "k")
    run = tmp_path / "run"
    make_trainer(ramp_config(run, train_iters=4, save_interval=1, keep_last_n=None)).run()
    root = run / "checkpoints"
    _flip_inside_shard(root / "iter_0000004")
    trainer = make_trainer(ramp_config(run, train_iters=4, load=str(root / "iter_0000003")))
    trainer.run()
    assert trainer.step == 4 and trainer.exit_code == 0
    assert layout.read_metadata(root / "iter_0000004")["signature"]  # rewritten whole, signed
    again = make_trainer(ramp_config(run, train_iters=4))  # a plain restart finds a good step 4
    assert again.step == 4
    before = snapshot(root)
    again.run()  # nothing to train: the checkpoint on disk is verified to be the one loaded
    assert snapshot(root) == before


def test_resume_applies_lr_and_refuses_routing_changes(megatron_world, tmp_path, capsys):
    from omegaconf import OmegaConf

    from rexmoe_train.checkpoint import CheckpointError

    base = tmp_path / "base"
    make_trainer(ramp_config(base, train_iters=2)).run()
    lr = ramp_config(base).train.lr
    # what a fresh run with the new values logs at step 3: the schedule is a function of (config, step)
    fresh_cfg = ramp_config(tmp_path / "fresh", train_iters=3)
    fresh_cfg.train.lr, fresh_cfg.train.min_lr = 2 * lr, lr / 20
    make_trainer(fresh_cfg).run()
    want = [json.loads(line)["lr"] for line in (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()
            if '"lr"' in line][-1]

    cfg = ramp_config(tmp_path / "resumed", train_iters=3, load=str(base / "checkpoints"))
    cfg.train.lr, cfg.train.min_lr, cfg.train.adam_eps = 2 * lr, lr / 20, 1e-6
    trainer = make_trainer(cfg)
    assert all(g["eps"] == 1e-6 for g in trainer.optimizer.param_groups)
    trainer.run()
    got = [json.loads(line)["lr"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert got == [want]
    out = capsys.readouterr().out
    assert f"[resume] train.lr: {lr!r} -> {2 * lr!r}" in out and "[resume] train.adam_eps" in out
    saved = OmegaConf.load(tmp_path / "resumed" / "checkpoints" / "iter_0000003" / layout.CONFIG)
    assert saved.train.lr == 2 * lr  # config.yaml records what ran

    changed = ramp_config(tmp_path / "refused", train_iters=3, load=str(base / "checkpoints"))
    changed.rexmoe.psr.end_step = 9
    with pytest.raises(CheckpointError, match=r"rexmoe.psr.end_step was 6, the config says 9") as err:
        make_trainer(changed)
    assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()


def test_a_run_that_never_trains_does_not_exit_0(megatron_world, tmp_path):
    """Weights so large that the first forward overflows: every step is skipped. The run halts
    (exit 3 through the CLI) instead of saving untrained weights as a finished run."""
    from rexmoe_train.training import guard

    cfg = ramp_config(tmp_path / "run", train_iters=3, max_skipped_steps=10)
    cfg.model.init_method_std = 1e30
    trainer = make_trainer(cfg)
    with pytest.raises(guard.TrainingHalted, match="all 3 steps of this run were skipped"):
        trainer.run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vocabulary_smaller_than_the_tokenizer_is_one_line(megatron_world, tmp_path):
    from rexmoe_train.config.schema import ConfigError

    cfg = ramp_config(tmp_path / "run", train_iters=2)
    cfg.model.vocab_size = 100  # the byte tokenizer has 256 (+ specials)
    with pytest.raises(ConfigError, match=r"model.vocab_size=100: must be >= the tokenizer's vocabulary") as err:
        make_trainer(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
