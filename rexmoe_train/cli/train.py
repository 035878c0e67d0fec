"""`rexmoe-train`: the Hydra entry point. Runs as one process (`rexmoe-train ...`) or under torchrun.

Composes configs/ (override anything on the command line: `model=rexmoe_0.5b rexmoe.reuse_group_size=1
train.train_iters=100`), validates it into typed dataclasses before anything is built, then trains.
A bad value exits with status 2 and one line naming the field and what is allowed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rexmoe_train.config.schema import ConfigError, experiment_from_dict


def config_dir() -> str:
    """configs/ of this checkout (the package is installed editable), or $REXMOE_CONFIG_DIR."""
    env = os.environ.get("REXMOE_CONFIG_DIR")
    return env or str(Path(__file__).resolve().parents[2] / "configs")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    data = resolved(cfg)
    try:
        experiment = experiment_from_dict(data).validate()
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    from rexmoe_train.training.trainer import Trainer  # heavy (megatron): after validation

    try:
        trainer = Trainer(experiment, resolved_config=data)
    except ConfigError as err:  # layout checks that need the world size
        print(err, file=sys.stderr)
        sys.exit(2)
    history = trainer.run()
    if trainer.rank == 0:
        last = next((h for h in reversed(history) if "loss" in h), {})
        evals = [h["val_loss"] for h in history if "val_loss" in h]
        summary = f"[done] {trainer.step} steps; final train loss {last.get('loss', float('nan')):.4f}"
        if evals:
            summary += f"; val_loss {evals[0]:.4f} (step 0) -> {evals[-1]:.4f}"
        print(summary, flush=True)
        print(f"[done] run dir: {experiment.run.dir} (config.yaml, metrics.jsonl)", flush=True)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
