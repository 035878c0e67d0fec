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
