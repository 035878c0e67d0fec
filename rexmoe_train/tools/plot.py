"""`rexmoe-plot RUN_DIR [--out DIR]`: PNG plots from a run's metrics.jsonl.

* ``loss.png``: ``loss`` and ``lm_loss`` against step, ``val_loss`` as points.
* ``expert_load_group{g}.png`` (when records carry ``expert_load``): per reuse group, a heatmap of
  tokens routed by each of the group's layers (rows) to each of its r*N candidate experts (columns,
  candidate order: owner layer 0's N experts, then owner layer 1's, ...), from the last record
  that has the field.
* ``reuse_matrix_group{g}.png`` (when records carry ``reuse_matrix``): per group, the r x r share
  of each router's assignments (row: router layer position in the group) that go to each owner
  layer's experts (column), from the last record that has it.
* time series against step, each when the records carry it: ``psr_candidates.png`` (candidates
  each router may choose, PSR), ``maxvio.png`` (MaxVio per MoE layer, ``load_violation_max``, and
  per reuse group over the pooled experts, ``group_load_violation_max``, dashed), ``under_used.png``
  (share of each layer's available candidates below the under-used threshold,
  ``under_used_fraction``) and ``lr.png`` (learning rate).

Needs only matplotlib (Agg backend: no display). A missing run dir or a metrics.jsonl without
records is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

__all__ = ["load_records", "plot_run", "PlotError", "time_series"]



class PlotError(Exception):
    """The run cannot be plotted; one-line message."""



def _save(plt, fig, path: Path) -> Path:
    """Lay out, write and close one figure (every plot ends the same way)."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

def load_records(run_dir: Path) -> list[dict]:
    """The JSON objects of ``run_dir/metrics.jsonl``. A torn last line (a run killed mid-write) and
    other undecodable lines are skipped."""
    if not run_dir.is_dir():
        raise PlotError(f"run dir not found: {run_dir}")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics.jsonl in {run_dir}")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    if not records:
        raise PlotError(f"{path} holds no records")
    return records


def _last_with(records: list[dict], key: str) -> Optional[dict]:
    return next((r for r in reversed(records) if r.get(key) is not None), None)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in r:
            steps.append(r["step"])
            values.append(float(value))
    return steps, values


def _indexed_series(records: list[dict], key: str) -> dict[int, tuple[list[float], list[float]]]:
    """A per-layer (per-group) list field as one (steps, values) series per list index."""
    out: dict[int, tuple[list[float], list[float]]] = {}
    for r in records:
        value = r.get(key)
        if not isinstance(value, list) or "step" not in r:
            continue
        for i, v in enumerate(value):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps, values = out.setdefault(i, ([], []))
                steps.append(r["step"])
                values.append(float(v))
    return out


# (file stem, title, y label, [(metrics key, label of list index i or None for a scalar, line style)])
TIME_SERIES = (
    ("psr_candidates", "PSR: candidates per router", "candidate experts",
     [("psr_candidates", None, {"lw": 1.6})]),
    ("maxvio", "MaxVio (max load / mean load - 1)", "MaxVio",
     [("load_violation_max", "MoE layer {i}", {"lw": 1.0}),
      ("group_load_violation_max", "group {i} (pooled)", {"lw": 1.6, "ls": "--"})]),
    ("under_used", "under-used candidates (load < 10% of the uniform share)", "share of available candidates",
     [("under_used_fraction", "MoE layer {i}", {"lw": 1.0})]),
    ("lr", "learning rate", "lr", [("lr", None, {"lw": 1.6})]),
)


def _curves(records: list[dict]) -> dict[str, list[tuple[str, dict, list[float], list[float]]]]:
    """{file stem: [(label, line style, steps, values)]} of the time-series plots that have data."""
    out = {}
    for stem, _, _, curves in TIME_SERIES:
        lines = []
        for key, label, style in curves:
            if label is None:
                steps, values = _series(records, key)
                if steps:
                    lines.append((key, style, steps, values))
            else:
                lines += [(label.format(i=i), style, steps, values)
                          for i, (steps, values) in _indexed_series(records, key).items()]
        if lines:
            out[stem] = lines
    return out


def time_series(records: list[dict]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{file stem: {curve label: (steps, values)}}: what the time-series plots draw."""
    return {stem: {label: (steps, values) for label, _, steps, values in lines}
            for stem, lines in _curves(records).items()}


def _plot_time_series(plt: Any, records: list[dict], out: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    paths = []
    data = _curves(records)
    for stem, title, ylabel, _ in TIME_SERIES:
        if stem not in data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for label, style, steps, values in data[stem]:
            ax.plot(steps, values, label=label, **style)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(data[stem]) > 1:
            ax.legend(fontsize=7, ncol=2 if len(data[stem]) > 6 else 1)
        ax.set_title(title)
        paths.append(_save(plt, fig, out / f"{stem}.png"))
    return paths


def _plot_losses(plt: Any, records: list[dict], out: Path) -> Optional[Path]:
    curves = {key: _series(records, key) for key in ("loss", "lm_loss", "val_loss")}
    if not any(steps for steps, _ in curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("loss", {"lw": 1.4}), ("lm_loss", {"lw": 1.0, "alpha": 0.8})):
        steps, values = curves[key]
        if steps:
            ax.plot(steps, values, label=key, **style)
    steps, values = curves["val_loss"]
    if steps:
        ax.plot(steps, values, "o", color="black", ms=5, label="val_loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    return _save(plt, fig, out / "loss.png")


def _plot_expert_load(plt: Any, record: dict, out: Path) -> list[Path]:
    import numpy as np

    paths = []
    for g, group in enumerate(record["expert_load"]):
        load = np.asarray(group, dtype=float)
        if load.ndim != 2 or load.size == 0:
            raise PlotError(f"expert_load[{g}] at step {record.get('step')} is not a list of layer rows")
        layers, candidates = load.shape
        experts_per_owner = candidates // layers if candidates % layers == 0 else None
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * candidates + 2), 1.0 + 0.6 * layers), dpi=110)
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="tokens")
        if experts_per_owner:  # owner boundaries between each layer's N experts
            for b in range(1, layers):
                ax.axvline(b * experts_per_owner - 0.5, color="white", lw=1.0)
        ax.set_yticks(range(layers))
        ax.set_yticklabels([f"layer {i}" for i in range(layers)])
        ax.set_xlabel("candidate expert (owner layer-major)")
        ax.set_title(f"expert load, reuse group {g} (step {record.get('step')})")
        paths.append(_save(plt, fig, out / f"expert_load_group{g}.png"))
    return paths


def _plot_reuse_matrix(plt: Any, record: dict, out: Path) -> list[Path]:
    import numpy as np

    paths = []
    for g, group in enumerate(record["reuse_matrix"]):
        matrix = np.asarray(group, dtype=float)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
            raise PlotError(f"reuse_matrix[{g}] at step {record.get('step')} is not a square matrix")
        r = matrix.shape[0]
        fig, ax = plt.subplots(figsize=(1.6 + 0.9 * r, 1.2 + 0.8 * r), dpi=110)
        image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=max(1e-9, float(matrix.max())))
        fig.colorbar(image, ax=ax, label="share of assignments")
        for i in range(r):
            for j in range(r):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 * matrix.max() else "white")
        ax.set_xticks(range(r))
        ax.set_yticks(range(r))
        ax.set_xlabel("owner layer (position in group)")
        ax.set_ylabel("router layer")
        ax.set_title(f"reuse matrix, group {g} (step {record.get('step')})")
        paths.append(_save(plt, fig, out / f"reuse_matrix_group{g}.png"))
    return paths


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the plots of ``run_dir`` into ``out`` (default ``run_dir/plots``); returns their paths."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out) if out is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    loss = _plot_losses(plt, records, out_dir)
    if loss is not None:
        paths.append(loss)
    paths.extend(_plot_time_series(plt, records, out_dir))
    for key, draw in (("expert_load", _plot_expert_load), ("reuse_matrix", _plot_reuse_matrix)):
        record = _last_with(records, key)
        if record is not None:
            paths.extend(draw(plt, record, out_dir))
    if not paths:
        raise PlotError(f"{run_dir / 'metrics.jsonl'} has no loss, val_loss, expert_load, reuse_matrix, "
                        "psr_candidates, load_violation_max, under_used_fraction or lr")
    return paths
