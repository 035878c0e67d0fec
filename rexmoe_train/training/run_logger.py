"""The run directory: resolved config, data description, metrics.jsonl, optional wandb, progress bar.

Only global rank 0 writes. metrics.jsonl holds one JSON object per logged step (and one per
evaluation), so a run can be plotted or compared with nothing but the standard library.

wandb and tqdm are imported only when used, so a machine without them (the GPU check kit carries
neither) trains with ``run.wandb.mode=disabled``; without tqdm the run just has no progress bar.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from rexmoe_train.checkpoint.layout import write_durable


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
        metrics_path = self.dir / "metrics.jsonl"
        if start_step == 0 and metrics_path.exists():
            # a fresh run in a used directory: keep the old metrics instead of overwriting them
            kept = self.dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(metrics_path, kept)
            print(f"[run] {metrics_path} existed; moved to {kept.name}", flush=True)
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
            self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or self.dir.name,
                                     dir=str(self.dir), mode=wandb_cfg.mode, config=resolved_config,
                                     resume="allow", settings=wandb.Settings(silent=True))
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

        OmegaConf.save(OmegaConf.create(data), self.dir / name)

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            (self.dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

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
    file reads as if the run had never stopped. Rank 0 only."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line torn by the kill: drop it
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    write_durable(tmp, "".join(line + "\n" for line in kept))
    os.replace(tmp, path)
