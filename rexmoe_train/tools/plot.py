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

``rexmoe-plot scaling`` (:func:`plot_scaling`): several runs per setting (one per seed) -> one PNG
with (a) validation loss against training tokens, mean and ±sd band per setting, and (b) Δ against
a baseline setting, paired by seed; :func:`scaling_table` prints the same numbers (docs/scaling.md).

Needs only matplotlib (Agg backend: no display). A missing run dir or a metrics.jsonl without
records is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rexmoe_train.tools import outputs

__all__ = ["load_records", "plot_run", "PlotError", "time_series", "eval_points", "scaling_summary", "scaling_table",
           "plot_scaling"]
OWNER = "rexmoe-plot"



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

    out_dir = _output_dir(run_dir, out)
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
    # the mark lists what this tool wrote here, so a later rexmoe-plot may replace exactly that
    outputs.write_marker(out_dir, OWNER, sorted(set(outputs.marked_files(out_dir, OWNER))
                                                | {str(p.relative_to(out_dir)) for p in paths}))
    return paths


def _output_dir(run_dir: Path, out: str | Path | None) -> Path:
    """``out`` (default ``run_dir/plots``), checked before anything is drawn: never the run dir or
    an input (metrics.jsonl), never inside a checkpoint, and, when it exists and is not empty, an
    earlier rexmoe-plot output holding nothing else (tools/outputs.py); created if absent."""
    out_dir = Path(out) if out is not None else run_dir / "plots"
    try:
        outputs.check_against_inputs(out_dir, [run_dir / "metrics.jsonl"], flag="--out")
        outputs.check_replaceable_dir(out_dir, OWNER, overwrite=True, flag="--out")
        out_dir.mkdir(parents=True, exist_ok=True)
    except outputs.OutputError as err:
        raise PlotError(str(err)) from None
    except OSError as err:
        raise PlotError(f"--out {out_dir}: cannot create it: {err.strerror or err}") from None
    return out_dir


# --------------------------------------------------------------------------------------------------
# `rexmoe-plot scaling`: validation loss and its difference to a baseline against training tokens,
# over several seeds per setting (docs/scaling.md)
# --------------------------------------------------------------------------------------------------


def _run_setup(run_dir: Path) -> dict:
    """Seed, tokens per step and target steps of a run, from its resolved config.yaml."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        train = (yaml.safe_load(path.read_text()) or {}).get("train", {})
        return {"seed": int(train["seed"]), "target": int(train["train_iters"]),
                "tokens_per_step": int(train["global_batch_size"]) * int(train["seq_length"])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as err:
        raise PlotError(f"{path}: cannot read train.seed / train_iters / global_batch_size / seq_length "
                        f"({type(err).__name__})") from None


def eval_points(records: list[dict]) -> dict[int, float]:
    """{step: val_loss} (a step evaluated twice, e.g. around a resume, keeps its last value)."""
    steps, values = _series(records, "val_loss")
    return dict(zip((int(s) for s in steps), values))


def _band(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _slope(points: list[dict]) -> Optional[float]:
    """Least-squares slope of the mean over the last third of the points' span, per million tokens."""
    if not points:
        return None
    last = points[-1]["tokens"]
    tail = [p for p in points if p["tokens"] >= last * 2 / 3]
    if len(tail) < 2:
        return None
    xs, ys = [p["tokens"] / 1e6 for p in tail], [p["mean"] for p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _points(curves: dict[int, dict[int, float]], tokens_per_step: int, complete: bool = True) -> list[dict]:
    """Per step that every seed's curve has (``complete=False``: any seed's): mean, sample sd, n and
    the values in seed order."""
    seeds = sorted(curves)
    steps = [set(c) for c in curves.values()]
    chosen = sorted((set.intersection if complete else set.union)(*steps)) if curves else []
    out = []
    for step in chosen:
        values = [curves[s][step] for s in seeds if step in curves[s]]
        mean, sd = _band(values)
        out.append({"step": step, "tokens": step * tokens_per_step, "mean": mean, "sd": sd, "n": len(values),
                    "values": values})
    return out


def scaling_summary(groups: dict[str, list[Path]], baseline: Optional[str] = None) -> dict:
    """Curves per setting over its seeds and, per other setting, Δ = setting − baseline paired by seed.

    ``groups``: {setting: [run dir, ...]} (one run per seed). ``points`` (figure, slope): only the
    evaluation steps every run of a setting (of a pair) has, so a band is always over the same seeds;
    ``all_points`` (table): every evaluated step, with its n."""
    if not groups or any(not dirs for dirs in groups.values()):
        raise PlotError("every setting needs at least one run dir")
    if baseline is not None and baseline not in groups:
        raise PlotError(f"baseline {baseline!r}: not one of the settings ({', '.join(groups)})")
    settings, tokens = {}, set()
    for name, dirs in groups.items():
        curves, last = {}, []
        for run_dir in map(Path, dirs):
            setup, points = _run_setup(run_dir), eval_points(load_records(run_dir))
            if setup["seed"] in curves:
                raise PlotError(f"setting {name!r}: two runs with seed {setup['seed']} ({run_dir})")
            if not points:
                raise PlotError(f"{run_dir / 'metrics.jsonl'} has no val_loss")
            curves[setup["seed"]] = points
            last.append(max(points))
            tokens.add(setup["tokens_per_step"])
        settings[name] = {"curves": curves, "last_steps": last, "target": setup["target"]}
    if len(tokens) != 1:
        raise PlotError(f"the runs differ in tokens per step ({sorted(tokens)}): curves would not align")
    per_step = tokens.pop()
    summary = {"tokens_per_step": per_step, "baseline": baseline, "settings": {}, "delta": {}}
    for name, s in settings.items():
        summary["settings"][name] = {"seeds": sorted(s["curves"]), "last_steps": s["last_steps"],
                                     "target": s["target"], "points": _points(s["curves"], per_step),
                                     "all_points": _points(s["curves"], per_step, complete=False)}
    if baseline is None:
        return summary
    base = settings[baseline]["curves"]
    for name, s in settings.items():
        if name == baseline:
            continue
        paired = {seed: {step: loss - base[seed][step] for step, loss in curve.items() if step in base[seed]}
                  for seed, curve in s["curves"].items() if seed in base}
        points = _points(paired, per_step) if paired else []
        summary["delta"][name] = {"seeds": sorted(paired), "points": points, "slope_last_third": _slope(points),
                                  "all_points": _points(paired, per_step, complete=False) if paired else []}
    return summary


def scaling_table(summary: dict) -> str:
    """Markdown: per evaluation step, mean ± sd of each setting and of each Δ (marked with its n where
    fewer seeds than the setting's have reached the step); then the slopes."""
    settings, delta = summary["settings"], summary["delta"]
    steps = sorted({p["step"] for s in settings.values() for p in s["all_points"]})
    cols = [(name, len(s["seeds"]), {p["step"]: p for p in s["all_points"]}) for name, s in settings.items()]
    cols += [(f"Δ {name}", len(d["seeds"]), {p["step"]: p for p in d["all_points"]}) for name, d in delta.items()]
    lines = ["| step | tokens (M) | " + " | ".join(name for name, _, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for step in steps:
        cells = []
        for name, seeds, points in cols:
            p = points.get(step)
            sign = "+" if name.startswith("Δ") else ""
            short = "" if p is None or p["n"] == seeds else f" (n={p['n']})"
            cells.append("" if p is None else f"{p['mean']:{sign}.4f} ± {p['sd']:.4f}{short}")
        lines.append(f"| {step} | {step * summary['tokens_per_step'] / 1e6:.3f} | " + " | ".join(cells) + " |")
    seeds = ", ".join(f"{name}: seeds {', '.join(map(str, s['seeds']))}, steps reached "
                      f"{'/'.join(map(str, s['last_steps']))} of {s['target']}" for name, s in settings.items())
    lines += ["", f"mean ± sample sd over seeds; Δ: paired by seed against {summary['baseline']}. {seeds}."]
    for name, d in delta.items():
        slope = d["slope_last_third"]
        lines.append(f"slope of Δ {name} over the last third of its points: "
                     + ("n/a (fewer than 2 points)" if slope is None else f"{slope:+.4f} per M tokens"))
    return "\n".join(lines)


def plot_scaling(groups: dict[str, list[Path]], out: str | Path, baseline: Optional[str] = None,
                 labels: Optional[dict[str, str]] = None) -> Path:
    """One PNG, two panels: (a) validation loss vs tokens, mean and ±sd band per setting; (b) Δ vs
    the baseline, paired by seed, with its band. ``out`` must be a .png that is not an input."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {out}: must be a .png file")
    if out.exists() and (not out.is_file() or out.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n"):
        raise PlotError(f"--out {out}: exists and is not a PNG: not overwritten")
    try:
        outputs.check_against_inputs(out, [Path(d) for dirs in groups.values() for d in dirs], flag="--out")
    except outputs.OutputError as err:
        raise PlotError(str(err)) from None
    summary = scaling_summary(groups, baseline)
    labels = labels or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if summary["delta"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.4), dpi=110, squeeze=False)

    def draw(ax, points, label, color):
        xs = [p["tokens"] / 1e6 for p in points]
        mean = [p["mean"] for p in points]
        ax.plot(xs, mean, marker=".", color=color, label=label)
        ax.fill_between(xs, [m - p["sd"] for m, p in zip(mean, points)], [m + p["sd"] for m, p in zip(mean, points)],
                        color=color, alpha=0.2, lw=0)

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: colors[i % len(colors)] for i, name in enumerate(summary["settings"])}
    ax = axes[0][0]
    for name, s in summary["settings"].items():
        draw(ax, s["points"], f"{labels.get(name, name)} (n={len(s['seeds'])})", color[name])
    later = [p["mean"] + k * p["sd"] for s in summary["settings"].values() for p in s["points"] if p["step"] > 0
             for k in (-1, 1)]
    if later:  # the step-0 loss (about log(vocab)) would flatten every difference that matters
        pad = 0.05 * (max(later) - min(later)) + 0.01
        ax.set_ylim(min(later) - pad, max(later) + pad)
    ax.set_title("(a) validation loss, mean ± sd over seeds (step 0 above the frame)")
    ax.set_ylabel("validation loss (nats/token)")
    if summary["delta"]:
        ax = axes[0][1]
        ax.axhline(0.0, color="black", lw=0.8)
        for name, d in summary["delta"].items():
            draw(ax, d["points"], f"{labels.get(name, name)} (n={len(d['seeds'])})", color[name])
        ax.set_title(f"(b) Δ vs {labels.get(baseline, baseline)}, paired by seed")
        ax.set_ylabel("Δ validation loss (< 0: better than the baseline)")
    for ax in axes[0]:
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, out)
