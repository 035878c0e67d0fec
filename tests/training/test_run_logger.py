"""training/run_logger.py: a run's own side files never block a resume. A damaged one (a directory
where a file belongs, bytes that are not text, lines that are not records, a file where a directory
belongs) is set aside with one warning line, nothing is deleted, and the run goes on."""

from __future__ import annotations

import json

from rexmoe_train.training.run_logger import RunLogger, set_aside, trim_metrics


def _aside(run_dir, name):
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(f"{name}.damaged-"))


def test_trim_keeps_records_up_to_the_step_and_drops_a_torn_last_line_silently(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    trim_metrics(str(tmp_path), 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(line + "\n" for line in lines[:3])
    assert capsys.readouterr().out == "" and _aside(tmp_path, "metrics.jsonl") == []


def test_trim_sets_a_damaged_metrics_file_aside_whole(tmp_path, capsys):
    original = '{"step": 1}\nGARBAGE\n[1, 2]\n{"step": 2}\n{"step": 9}\n'
    (tmp_path / "metrics.jsonl").write_text(original)
    trim_metrics(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    [aside] = _aside(tmp_path, "metrics.jsonl")
    assert aside.read_text() == original  # nothing lost
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "has 2 line(s) that are not JSON records" in out[0] and aside.name in out[0]


def test_trim_sets_aside_metrics_that_are_not_text_or_not_a_file(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\x00binary")
    trim_metrics(str(tmp_path), 3)
    assert not (tmp_path / "metrics.jsonl").exists() and len(_aside(tmp_path, "metrics.jsonl")) == 1
    (tmp_path / "metrics.jsonl").mkdir()
    (tmp_path / "metrics.jsonl" / "x").write_text("user data")
    (tmp_path / "metrics.jsonl.tmp").mkdir()
    trim_metrics(str(tmp_path), 3)
    assert len(_aside(tmp_path, "metrics.jsonl")) == 2 and len(_aside(tmp_path, "metrics.jsonl.tmp")) == 1
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_the_logger_sets_damaged_side_files_aside_and_writes_new_ones(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").mkdir()
    (tmp_path / "config.yaml").mkdir()
    (tmp_path / "data.json").mkdir()
    (tmp_path / "logs").write_text("not a directory")
    logger = RunLogger(str(tmp_path), enabled=True, total_steps=4, start_step=2, progress=False,
                       resolved_config={"train": {"train_iters": 4}})
    logger.write_json("data.json", {"vocab_size": 256})
    logger.log({"step": 3, "loss": 2.5})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 2.5}
    assert "train_iters: 4" in (tmp_path / "config.yaml").read_text()
    assert json.loads((tmp_path / "data.json").read_text()) == {"vocab_size": 256}
    assert not (tmp_path / "logs").exists()
    for name in ("metrics.jsonl", "config.yaml", "data.json", "logs"):
        assert len(_aside(tmp_path, name)) == 1, name
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 4, warnings


def test_set_aside_never_overwrites_an_earlier_one(tmp_path):
    for i in range(3):
        (tmp_path / "model.json").write_text(str(i))
        set_aside(tmp_path / "model.json", "is damaged")
    assert sorted(p.read_text() for p in _aside(tmp_path, "model.json")) == ["0", "1", "2"]


def test_a_resume_goes_on_past_damaged_side_files(megatron_world, tmp_path):
    """A real run saves at step 2; its metrics, data description, logs dir, lock file and wandb dir are
    damaged; the resumed run (with wandb offline) loads step 2, trains to step 3 and logs it."""
    from rexmoe_train import checkpoint
    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(r=2, layers=2)
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 2, 100, 1
    cfg.run.dir, cfg.run.progress = str(tmp_path / "run"), False
    cfg.checkpoint.async_save, cfg.run.wandb.mode = False, "disabled"
    make_trainer(cfg).run()
    run = tmp_path / "run"
    (run / "metrics.jsonl").write_bytes(b"\x00\xff torn \xfe")
    (run / "data.json").unlink()
    (run / "data.json").mkdir()
    (run / "wandb").write_text("a file where wandb's dir belongs")
    (run / "logs").mkdir(exist_ok=True)
    (run / "logs").rename(run / "old-logs")
    (run / "logs").write_text("a file where the logs dir belongs")
    (run / "rexmoe.lock").unlink()
    (run / "rexmoe.lock").mkdir()
    cfg.train.train_iters, cfg.run.wandb.mode = 3, "offline"
    trainer = make_trainer(cfg)
    assert trainer.step == 2
    trainer.run()
    assert trainer.step == 3 and checkpoint.read_tracker(run / "checkpoints") == 3
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [3]
    assert json.loads((run / "data.json").read_text())["vocab_size"] > 0
    for name in ("metrics.jsonl", "data.json", "logs", "rexmoe.lock", "wandb"):
        assert len(_aside(run, name)) == 1, name
