"""rexmoe-plot: PNGs from a (synthetic) metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rexmoe_train.cli.plot import main
from rexmoe_train.tools.plot import load_records, plot_run, time_series


def _write_metrics(run_dir: Path) -> None:
    rng = np.random.default_rng(0)
    records = [{"step": 0, "consumed_samples": 0, "val_loss": 5.6}]
    for step in range(1, 21):
        records.append({"step": step, "loss": 5.6 - 0.1 * step, "lm_loss": 5.5 - 0.1 * step})
        if step % 2:  # the per-step routing metrics, as the trainer logs them (every other step here)
            records[-1].update(
                psr_candidates=min(8 + step, 16), lr=1e-3 * min(step, 5) / 5,
                load_violation_max=rng.uniform(0, 3, size=3).round(4).tolist(),
                under_used_fraction=rng.uniform(0, 1, size=3).round(4).tolist(),
                group_load_violation_max=rng.uniform(0, 2, size=2).round(4).tolist())
    # an early record with three groups: the plots must use the LAST record with each field
    records[5]["expert_load"] = [[[1, 2], [3, 4]]] * 3
    records[5]["reuse_matrix"] = [[[1.0]]] * 3
    # last: group 0 with r=2 layers x 2*3 candidates; group 1 (partial) with r=1 x 3
    records[20]["expert_load"] = [rng.integers(0, 100, size=(2, 6)).tolist(),
                                  rng.integers(0, 100, size=(1, 3)).tolist()]
    records[20]["reuse_matrix"] = [[[0.7, 0.3], [0.4, 0.6]], [[1.0]]]
    records[20]["val_loss"] = 3.9
    lines = [json.dumps(r) for r in records] + ['{"step": 21, "loss": ']  # torn last line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] > 50 and image.shape[1] > 50 and float(image.std()) > 0.01


def test_plots_written(tmp_path):
    _write_metrics(tmp_path)
    out = tmp_path / "figs"
    paths = plot_run(tmp_path, out)
    assert sorted(p.name for p in paths) == sorted([
        "loss.png", "expert_load_group0.png", "expert_load_group1.png",
        "reuse_matrix_group0.png", "reuse_matrix_group1.png",
        "psr_candidates.png", "maxvio.png", "under_used.png", "lr.png"])
    for path in paths:
        assert path.parent == out
        _png_ok(path)


def test_loss_only_run_default_out(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lm_loss": 2.9}) + "\n")
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "loss.png")]
    _png_ok(tmp_path / "plots" / "loss.png")


@pytest.mark.parametrize("setup,phrase", [
    ("missing_dir", "run dir not found"),
    ("no_metrics", "no metrics.jsonl"),
    ("empty_metrics", "holds no records"),
])
def test_errors_one_line_exit_2(tmp_path, capsys, setup, phrase):
    run_dir = tmp_path / "run"
    if setup != "missing_dir":
        run_dir.mkdir()
    if setup == "empty_metrics":
        (run_dir / "metrics.jsonl").write_text("\n")
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rexmoe-plot: error:") and phrase in err


def test_time_series_come_from_the_records(tmp_path):
    """Every curve is exactly its field over the records that carry it, in step order."""
    _write_metrics(tmp_path)
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:-1]]
    logged = [r for r in raw if "psr_candidates" in r]
    steps = [r["step"] for r in logged]
    assert steps == list(range(1, 21, 2))
    series = time_series(load_records(tmp_path))
    assert series["psr_candidates"] == {"psr_candidates": (steps, [float(r["psr_candidates"]) for r in logged])}
    assert series["lr"] == {"lr": (steps, [r["lr"] for r in logged])}
    maxvio = series["maxvio"]
    assert sorted(maxvio) == sorted([f"MoE layer {i}" for i in range(3)] + ["group 0 (pooled)", "group 1 (pooled)"])
    for i in range(3):
        assert maxvio[f"MoE layer {i}"] == (steps, [r["load_violation_max"][i] for r in logged])
        assert series["under_used"][f"MoE layer {i}"] == (steps, [r["under_used_fraction"][i] for r in logged])
    assert maxvio["group 1 (pooled)"] == (steps, [r["group_load_violation_max"][1] for r in logged])
    # a loss-only run has none of them, and writes none of their files
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert time_series(load_records(tmp_path)) == {}
    assert [p.name for p in plot_run(tmp_path, tmp_path / "o")] == ["loss.png"]


# --- rexmoe-plot scaling: loss and Δ vs tokens over seeds (docs/scaling.md) -----------------------

SCALING_STEPS = [0, 250, 500, 750, 1000, 1250]


def _scaling_run(root: Path, name: str, seed: int, losses: list[float], gbs: int = 8, seq: int = 256) -> Path:
    """A run dir as the trainer leaves it: config.yaml (the fields read) and metrics.jsonl with
    training records between the evaluations, a torn last line, and one evaluation repeated."""
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  seed: {seed}\n  train_iters: 1250\n  global_batch_size: {gbs}\n"
                                     f"  seq_length: {seq}\nmodel:\n  num_layers: 4\n")
    lines = []
    for step, loss in zip(SCALING_STEPS, losses):
        lines.append(json.dumps({"step": step, "loss": loss + 0.5}))
        if step == 500:  # evaluated before a stop and again after the resume: the last value counts
            lines.append(json.dumps({"step": step, "val_loss": loss + 9.0}))
        lines.append(json.dumps({"step": step, "val_loss": loss}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99')
    return run


def _scaling_fixture(tmp_path):
    rng = np.random.default_rng(3)
    vanilla = {s: 3.0 - 0.3 * np.log1p(np.arange(6)) + rng.normal(0, 0.02, 6) for s in (42, 43, 44)}
    # reuse: vanilla plus a per-seed offset and a Δ that falls linearly with tokens from step 500 on
    drift = np.array([0.05, 0.03, 0.01, -0.01, -0.03, -0.05])
    reuse = {s: vanilla[s] + drift + 0.004 * (s - 43) for s in (42, 43, 44)}
    groups = {"vanilla": [_scaling_run(tmp_path, "vanilla", s, vanilla[s].tolist()) for s in (42, 43, 44)],
              "r4": [_scaling_run(tmp_path, "r4", s, reuse[s].tolist()) for s in (44, 42, 43)]}  # any order
    return groups, vanilla, reuse


def test_scaling_summary_against_numpy(tmp_path):
    from rexmoe_train.tools.plot import scaling_summary, scaling_table

    groups, vanilla, reuse = _scaling_fixture(tmp_path)
    summary = scaling_summary(groups, baseline="vanilla")
    assert summary["tokens_per_step"] == 2048
    r4 = summary["settings"]["r4"]
    assert r4["seeds"] == [42, 43, 44] and r4["last_steps"] == [1250] * 3
    assert [p["step"] for p in r4["points"]] == SCALING_STEPS
    values = np.stack([reuse[s] for s in (42, 43, 44)])
    for i, p in enumerate(r4["points"]):
        assert p["tokens"] == SCALING_STEPS[i] * 2048 and p["n"] == 3
        assert p["mean"] == pytest.approx(values[:, i].mean(), abs=1e-12)
        assert p["sd"] == pytest.approx(values[:, i].std(ddof=1), abs=1e-12)
    deltas = values - np.stack([vanilla[s] for s in (42, 43, 44)])
    d = summary["delta"]["r4"]
    for i, p in enumerate(d["points"]):
        assert p["values"] == pytest.approx(deltas[:, i].tolist(), abs=1e-12)
        assert p["mean"] == pytest.approx(deltas[:, i].mean(), abs=1e-12)
        assert p["sd"] == pytest.approx(deltas[:, i].std(ddof=1), abs=1e-12)
    # last third of the tokens span (steps >= 833): steps 1000 and 1250; slope per million tokens
    tail = np.array([1000, 1250]) * 2048 / 1e6
    assert d["slope_last_third"] == pytest.approx(np.polyfit(tail, deltas.mean(axis=0)[4:], 1)[0], rel=1e-9)
    table = scaling_table(summary)
    row = next(line for line in table.splitlines() if line.startswith("| 1250 |"))
    assert f"{values[:, 5].mean():.4f} ± {values[:, 5].std(ddof=1):.4f}" in row
    assert f"{deltas[:, 5].mean():+.4f} ± {deltas[:, 5].std(ddof=1):.4f}" in row
    assert f"{d['slope_last_third']:+.4f} per M tokens" in table


def _val(run_dir: Path, step: int) -> float:
    records = [json.loads(line) for line in run_dir.joinpath("metrics.jsonl").read_text().splitlines()[:-1]]
    return [r["val_loss"] for r in records if r["step"] == step and "val_loss" in r][-1]


def test_scaling_partial_runs_use_common_steps_only(tmp_path):
    from rexmoe_train.tools.plot import scaling_summary, scaling_table

    groups, vanilla, _ = _scaling_fixture(tmp_path)
    short = groups["r4"][0]  # seed 44 stopped after its step-500 evaluation
    lines = short.joinpath("metrics.jsonl").read_text().splitlines()
    cut = max(i for i, line in enumerate(lines) if '"step": 500' in line and "val_loss" in line)
    short.joinpath("metrics.jsonl").write_text("\n".join(lines[:cut + 1]) + "\n")
    summary = scaling_summary(groups, baseline="vanilla")
    assert summary["settings"]["r4"]["last_steps"] == [500, 1250, 1250]
    assert [p["step"] for p in summary["settings"]["r4"]["points"]] == [0, 250, 500]
    assert [p["step"] for p in summary["delta"]["r4"]["points"]] == [0, 250, 500]
    assert [p["step"] for p in summary["settings"]["vanilla"]["points"]] == SCALING_STEPS
    # the table still shows the later steps, as means over the seeds that reached them, with their n
    later = np.array([_val(groups["r4"][i], 1250) for i in (1, 2)])
    row = next(line for line in scaling_table(summary).splitlines() if line.startswith("| 1250 |"))
    assert f"{later.mean():.4f} ± {later.std(ddof=1):.4f} (n=2)" in row


def test_scaling_figure_from_the_cli(tmp_path, capsys):
    groups, _, _ = _scaling_fixture(tmp_path)
    out = tmp_path / "figs" / "scaling.png"
    spec = [f"--setting={name}={','.join(map(str, dirs))}" for name, dirs in groups.items()]
    assert main(["scaling", *spec, "--out", str(out), "--table"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and any(line.startswith("| 1250 |") for line in printed)
    _png_ok(out)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"baseline": "vanilla", "labels": {"r4": "r=4"},
                                    "settings": {k: [str(d) for d in v] for k, v in groups.items()}}))
    assert main(["scaling", "--manifest", str(manifest), "--out", str(out)]) == 0  # replaces its own PNG
    _png_ok(out)


@pytest.mark.parametrize("case,phrase", [
    ("bad_setting", "must be NAME=DIR"),
    ("not_png", "must be a .png"),
    ("over_input", "not a PNG: not overwritten"),
    ("tokens_differ", "differ in tokens per step"),
    ("same_seed", "two runs with seed 43"),
    ("bad_baseline", "baseline 'nope'"),
])
def test_scaling_bad_input_one_line_exit_2(tmp_path, capsys, case, phrase):
    groups, _, _ = _scaling_fixture(tmp_path)
    v = ",".join(map(str, groups["vanilla"]))
    r = ",".join(map(str, groups["r4"]))
    out = str(tmp_path / "fig.png")
    argv = {"bad_setting": ["--setting", "vanilla", "--out", out],
            "not_png": ["--setting", f"vanilla={v}", "--out", str(tmp_path / "fig.jpg")],
            "over_input": ["--setting", f"vanilla={v}", "--out", str(tmp_path / "notes.png")],
            "tokens_differ": ["--setting", f"vanilla={v}", "--setting",
                              f"r4={_scaling_run(tmp_path, 'wide', 42, [3.0] * 6, gbs=16)}", "--out", out],
            "same_seed": ["--setting", f"r4={r},{groups['vanilla'][1]}", "--out", out],
            "bad_baseline": ["--setting", f"vanilla={v}", "--baseline", "nope", "--out", out]}[case]
    (tmp_path / "notes.png").write_text("not an image: never overwritten\n")
    before = (groups["vanilla"][0] / "metrics.jsonl").read_bytes()
    assert main(["scaling", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rexmoe-plot") and phrase in err, err
    assert (groups["vanilla"][0] / "metrics.jsonl").read_bytes() == before
    assert (tmp_path / "notes.png").read_text() == "not an image: never overwritten\n"
    assert not (tmp_path / "fig.png").exists()
