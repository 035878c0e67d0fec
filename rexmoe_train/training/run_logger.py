"""The run directory: resolved config, data description, metrics.jsonl, optional wandb, progress bar.

Only global rank 0 writes. metrics.jsonl holds one JSON object per logged step (and one per
evaluation), so a run can be plotted or compared with nothing but the standard library.

wandb and tqdm are imported only when used, so a machine without them (the GPU check kit carries
neither) trains with ``run.wandb.mode=disabled``; without tqdm the run just has no progress bar.

The run's own side files (metrics.jsonl, config.yaml, data.json, model.json, the wandb, logs and hang
dirs) never block a resume: a damaged one (a directory where a file belongs or the reverse, unreadable,
unwritable, lines that are not records) is set aside, renamed ``<name>.damaged-<time>`` with one warning
line, and the run goes on (``set_aside``). Nothing is deleted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from rexmoe_train.checkpoint.layout import write_durable


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged side file or dir out of the way, with one warning line; returns the new path.
    Raises the OSError when even the rename fails (the run dir itself is then unusable)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while os.path.lexists(aside):
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    os.rename(path, aside)
    print(f"[run] warning: {path} {why}; set aside as {aside.name} and the run goes on", flush=True)
    return aside


def _kind_problem(path: Path, want_dir: bool) -> Optional[str]:
    """Why ``path`` cannot be used as a regular file (or a directory); None when it can or is absent."""
    if not os.path.lexists(path):
        return None
    if want_dir:
        return None if path.is_dir() else "is not a directory"
    if path.is_symlink() and not path.exists():
        return "is a dangling symlink"
    return None if path.is_file() else ("is a directory" if path.is_dir() else "is not a regular file")


def usable(path: Path, want_dir: bool = False) -> Path:
    """``path``, after setting aside whatever of the wrong kind stands there."""
    problem = _kind_problem(path, want_dir)
    if problem:
        set_aside(path, problem)
    return path


def write_side_file(path: Path, write) -> None:
    """``write(path)``; a side file that cannot be written (unwritable, of the wrong kind) is set aside
    and written anew once."""
    try:
        write(usable(path))
    except OSError as err:
        if not os.path.lexists(path):
            raise  # not the file: the directory itself
        set_aside(path, f"cannot be written ({err.strerror or err})")
        write(path)


class RunLogger:
    def __init__(self, run_dir: str, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, wandb_cfg: Any = None, resolved_config: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.dir = Path(run_dir)
        self._wandb = None
        self._bar = None
        self._metrics = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # the watchdog (every rank, after a collective that follows this) writes into logs/ and hang/
        for name in ("logs", "hang") + (("wandb",) if wandb_cfg is not None and wandb_cfg.mode != "disabled" else ()):
            usable(self.dir / name, want_dir=True)
        metrics_path = usable(self.dir / "metrics.jsonl")
        if start_step == 0 and metrics_path.exists():
            # a fresh run in a used directory: keep the old metrics instead of overwriting them
            kept = self.dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(metrics_path, kept)
            print(f"[run] {metrics_path} existed; moved to {kept.name}", flush=True)
        try:
            self._metrics = open(metrics_path, "a", buffering=1)
        except OSError as err:  # unwritable (mode 000, another owner): keep it, start a new one
            if not metrics_path.exists():
                raise
            set_aside(metrics_path, f"cannot be appended to ({err.strerror or err})")
            self._metrics = open(metrics_path, "a", buffering=1)
        if resolved_config is not None:
            self.write_yaml("config.yaml", resolved_config)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            try:
                import wandb
            except ImportError:
                from rexmoe_train.config.schema import ConfigError

                raise ConfigError(f"config error: run.wandb.mode={wandb_cfg.mode!r} needs the wandb "
                                  "package, which is not installed: pip install wandb, or set "
                                  "run.wandb.mode=disabled") from None

            # silent: wandb's banner would bury the progress bar; nothing secret is ever passed here
            # (offline needs no key; online reads the user's own login, never our config)
            def start():
                return wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or self.dir.name,
                                  dir=str(self.dir), mode=wandb_cfg.mode, config=resolved_config,
                                  resume="allow", settings=wandb.Settings(silent=True))

            try:
                self._wandb = start()
            except Exception as err:  # noqa: BLE001 -- wandb's own files in the run dir: never block a resume
                try:
                    set_aside(self.dir / "wandb", f"could not be resumed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})")
                    self._wandb = start()
                except Exception as again:  # noqa: BLE001
                    print(f"[run] warning: wandb did not start ({type(again).__name__}); the run goes on "
                          "without it (metrics.jsonl has every record)", flush=True)
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:  # only the bar is lost: messages still print, metrics still logged
                print("[run] tqdm is not installed: no progress bar", flush=True)
                return
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def write_yaml(self, name: str, data: dict) -> None:
        from omegaconf import OmegaConf

        write_side_file(self.dir / name, lambda path: OmegaConf.save(OmegaConf.create(data), path))

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            write_side_file(self.dir / name, lambda path: path.write_text(text))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb.log(scalars, step=record["step"])

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def trim_metrics(run_dir: str, step: int) -> None:
    """On resume, drop metrics.jsonl records past the checkpoint's step (they will be redone), so the
    file reads as if the run had never stopped. Rank 0 only. A line torn by a kill (the last one) is
    dropped; a file that cannot be read, or with other lines that are not records, is set aside whole
    (nothing lost) and the records that could be read go on in a new one."""
    path = usable(Path(run_dir) / "metrics.jsonl")
    tmp = usable(path.with_suffix(".jsonl.tmp"))
    if not path.exists():
        return
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        set_aside(path, f"cannot be read ({getattr(err, 'strerror', None) or type(err).__name__})")
        return
    kept, bad = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
                raise ValueError(line)
        except ValueError:
            bad += i < len(lines) - 1  # the last line torn by the kill is expected, not damage
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    if bad:
        set_aside(path, f"has {bad} line(s) that are not JSON records")
    write_durable(tmp, "".join(line + "\n" for line in kept))
    os.replace(tmp, path)
