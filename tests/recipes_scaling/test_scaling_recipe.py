"""recipes/scaling/run.py and corpus.py: the three settings' commands (valid, pinned, identical on
every call so the trainer resumes), the rule's verdict, the corpus layout that puts exactly the
validation descriptions in the validation split, and bad arguments."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import script_module

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "recipes" / "scaling" / "run.py"


def _recipe():
    with script_module(SCRIPT, "scaling_run") as module:
        return module


def test_commands_are_valid_pinned_and_stable(tmp_path):
    from rexmoe_train.config.compose import compose_experiment

    recipe = _recipe()
    args = recipe.parse(["--out", str(tmp_path), "--budget-minutes", "1"])
    data = {"prefix": str(tmp_path / "unseen"), "split": "2372,18,0"}
    default = compose_experiment(["rexmoe.reuse_group_size=4"]).experiment.rexmoe
    for setting in recipe.SETTINGS:
        cmd = recipe.train_command(setting, 43, args, data)
        assert cmd == recipe.train_command(setting, 43, args, data)  # same overrides: a rerun resumes
        cfg = compose_experiment(cmd[3:]).experiment.validate()
        t = cfg.train
        assert (t.seed, t.train_iters, t.eval_interval, t.global_batch_size * t.seq_length) == (43, 3000, 250, 2048)
        assert cfg.checkpoint.save_interval == 125 and cfg.data.split == "2372,18,0"
        x = cfg.rexmoe
        assert x.reuse_group_size == setting.reuse and x.psr.schedule == setting.psr
        # the paper's 2.3B ramp, 10k -> 30k of 47.7k steps, as fractions of 3000 steps
        assert (x.psr.start_step, x.psr.end_step) == (round(3000 * 10 / 47.7), round(3000 * 30 / 47.7)) == (629, 1887)
        for field in ("gating", "gate_normalization"):
            assert getattr(x, field) == getattr(default, field), field
        for field in ("mask_draw", "protect_local", "mask_on"):
            assert getattr(x.psr, field) == getattr(default.psr, field), field
    # r4 is the packaged default itself (PSR off); r4_psr differs from it in the PSR schedule only
    assert default.psr.schedule == "none"


def _summary(final: dict[str, list[float]], last_steps=(3000, 3000)):
    return {"settings": {name: {"last_steps": list(last_steps)} for name in ("vanilla", *final)},
            "delta": {name: {"points": [{"step": 3000, "mean": sum(v) / len(v), "values": v}]}
                      for name, v in final.items()}}


def test_verdict_follows_the_rule():
    recipe = _recipe()
    lines = recipe.verdict(_summary({"r4": [-0.02, -0.01], "r4_psr": [-0.05, 0.01]}), 3000).splitlines()
    assert "reuse PAYS" in lines[0] and lines[0].startswith("r4:")
    assert "does not pay" in lines[1]  # mean below 0, one seed above: not on the same side
    partial = recipe.verdict(_summary({"r4": [-0.02, -0.01]}, last_steps=(3000, 1250)), 3000)
    assert partial.startswith("PARTIAL") and "1250/3000" in partial and "PAYS" not in partial


def test_troff_rendering():
    corpus = _recipe().corpus
    source = '.\\" a comment\n.TH FOO 1\n.SH NAME\nfoo \\- do \\fBthings\\fR\n.de XX\nhidden\n..\n' \
             '.PP\nA \\(lqquoted\\(rq word\nand more.\n.B bold words\n.sp\nNext.\n'
    assert corpus.troff_to_text(source) == 'FOO 1\n\nNAME\n\nfoo - do things\n\nA "quoted" word and more. ' \
                                           'bold words\n\nNext.\n'


def test_corpus_puts_exactly_the_validation_descriptions_last(tmp_path, monkeypatch):
    corpus = _recipe().corpus
    man = tmp_path / "man"
    (man / "man5").mkdir(parents=True)
    for name in ("b.5", "a.5", "dup.5"):
        text = "same page text " * 40 if name != "a.5" else "another page text " * 40
        (man / "man5" / f"{name}.gz").write_bytes(gzip.compress(f".SH NAME\n{text}\n".encode()))
    site = tmp_path / "site"
    for i, name in enumerate(("zeta-1", "alpha-2", "mid-3", "beta-1", "omega-9")):
        (site / f"{name}.dist-info").mkdir(parents=True)
        (site / f"{name}.dist-info" / "METADATA").write_text(f"Name: {name}\n\ndescription {i}\n")
    monkeypatch.setattr(corpus, "MAN_ROOT", man)
    manifest = corpus.build(tmp_path / "data", site)
    # 2 distinct pages (b.5 and dup.5 are the same text), 4 train descriptions, 1 validation one
    assert manifest["man_pages"] == 2 and manifest["split"] == "6,1,0"
    assert manifest["valid_distributions"] == ["zeta-1.dist-info"]  # the last in name order
    docs = [json.loads(line)["text"] for line in (tmp_path / "data" / "corpus.jsonl").read_text().splitlines()]
    assert docs[-1].startswith("Name: zeta-1") and docs[2].startswith("Name: alpha-2")
    meta = json.loads((tmp_path / "data" / "unseen.json").read_text())
    assert meta["documents"] == 7
    assert corpus.ensure(tmp_path / "data", site) == manifest  # built once, then reused as it is


@pytest.mark.parametrize("argv,phrase", [
    ([], "give --budget-minutes"),
    (["--budget-minutes", "0"], "--budget-minutes 0"),
    (["--deadline", "25:00"], "must be HH:MM"),
    (["--seeds", "42", "42", "--report"], "must be distinct"),
    (["--only", "r8", "--report"], "invalid choice"),
])
def test_bad_arguments_one_line_exit_2(argv, phrase, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *argv], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and phrase in proc.stderr, proc.stderr


def _fake_run(out: Path, name: str, seed: int, val: dict[int, float], routing: list[dict] = ()) -> None:
    run = out / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  seed: {seed}\n  train_iters: 3000\n  global_batch_size: 8\n"
                                     "  seq_length: 256\n")
    lines = [json.dumps({"step": step, "val_loss": loss}) for step, loss in val.items()]
    (run / "metrics.jsonl").write_text("\n".join([*lines, *map(json.dumps, routing)]) + "\n")


def test_report_is_partial_and_explain_averages_the_window(tmp_path):
    recipe = _recipe()
    args = recipe.parse(["--out", str(tmp_path), "--seeds", "42", "--report"])
    _fake_run(tmp_path, "vanilla", 42, {0: 5.8, 250: 3.30, 500: 3.00})
    routing = [{"step": s, "psr_candidates": 32, "reuse_matrix": [[[0.7, 0.3], [0.2, 0.8]]],
                "load_violation_max": [1.0 * k, 2.0], "load_entropy": [0.9, 0.8 + 0.01 * k],
                "under_used_fraction": [0.0, 0.1]} for k, s in enumerate((160, 200, 250, 260))]
    _fake_run(tmp_path, "r4", 42, {0: 5.8, 250: 3.25}, routing)
    text = recipe.report(args)
    assert "| 250 | 0.512 | 3.3000 ± 0.0000 | 3.2500 ± 0.0000 | " in text and "-0.0500 ± 0.0000" in text
    assert "PARTIAL" in text and "r4 250/3000" in text and "r4_psr-s42" in text and "PAYS" not in text
    explained = recipe.explain(args)
    # step 250's window (150, 250]: the records of steps 160, 200, 250 (k = 0, 1, 2); 260 is later
    row = next(line for line in explained.splitlines() if line.startswith("| 250 |"))
    assert row == "| 250 | 32 | 0.30 / 0.20 | 1.00 / 2.00 | 0.900 / 0.810 | 0.000 / 0.100 |"


def test_two_invocations_on_other_seeds_keep_each_others_progress(tmp_path):
    """Slices recorded by two invocations (--seeds 42 and --seeds 43) in turn: each re-reads
    progress.json under the lock, so neither overwrites the other's entries, CPU time adds up, and
    the manifest lists every started run of both."""
    recipe = _recipe()
    for name in ("vanilla-s42", "vanilla-s43"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    result = {"exit": 75, "cpu_s": 60.0, "wall_s": 61.0}
    for name, seed in (("vanilla-s42", 42), ("vanilla-s43", 43), ("vanilla-s42", 42)):
        fields = {"setting": "vanilla", "seed": seed, "dir": str(tmp_path / name), "step": 10, "finished": False}
        recipe.record_slice(tmp_path, name, fields, result, [seed], 3000)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["seeds"] == [42, 43]
    assert progress["runs"]["vanilla-s42"]["slices"] == 2 and progress["runs"]["vanilla-s42"]["cpu_s"] == 120.0
    assert progress["runs"]["vanilla-s43"]["slices"] == 1 and progress["cpu_s_total"] == 180.0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["vanilla"] == [str(tmp_path / "vanilla-s42"), str(tmp_path / "vanilla-s43")]
    with recipe.locked(tmp_path / "locks" / "vanilla-s42.lock", wait=False) as mine:
        assert mine
        with recipe.locked(tmp_path / "locks" / "vanilla-s42.lock", wait=False) as again:
            assert not again  # a second open file (as a second invocation holds) is refused: skip the run
    with recipe.locked(tmp_path / "locks" / "vanilla-s42.lock", wait=False) as mine:
        assert mine  # released when the first was done
