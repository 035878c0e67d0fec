"""`rexmoe-train`: the Hydra entry point. Runs as one process (`rexmoe-train ...`) or under torchrun.

Composes configs/ (override anything on the command line: `model=rexmoe_0.5b rexmoe.reuse_group_size=1
train.train_iters=100`), validates it into typed dataclasses before anything is built, then trains.
A bad value exits with status 2 and one line naming the field and what is allowed; so does a missing,
damaged or mismatched checkpoint. Exit 75: pre-empted (SIGTERM/SIGUSR1) or out of time
(checkpoint.exit_duration_mins), checkpoint saved: run again to resume. Exit 3: halted after more
than checkpoint.max_skipped_steps non-finite steps. See docs/reliability.md.
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


def dry_run(experiment) -> int:
    """Describe the run without building it: no process group, no megatron, no data read."""
    from rexmoe_train.tools.dry_run import describe

    if experiment.data.source == "embedded":
        from rexmoe_train.data import ByteTokenizer

        vocab = ByteTokenizer().vocab_size
    else:
        from rexmoe_train.data.text_tokenizer import load_tokenizer

        vocab = load_tokenizer(experiment.data.tokenizer).vocab_size
    vocab = experiment.model.vocab_size or vocab
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            print(describe(experiment, vocab, world_size=world, bf16=experiment.train.bf16 is not False),
                  flush=True)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
    return 0


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    data = resolved(cfg)
    try:
        experiment = experiment_from_dict(data).validate()
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    if experiment.run.dry_run:
        sys.exit(dry_run(experiment))
    from rexmoe_train.threads import ThreadsError, set_intra_op_threads

    try:
        choice = set_intra_op_threads(experiment.run.num_threads)
    except ThreadsError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        wait = f"OMP_WAIT_POLICY={_WAIT_POLICY}" if _WAIT_POLICY else "OpenMP wait policy: runtime default"
        print(f"[threads] intra-op threads: {choice.threads} ({choice.reason}; {wait})", flush=True)
    from rexmoe_train.training.checkpoint import CheckpointError, TrainingHalted, EXIT_HALTED
    from rexmoe_train.training.trainer import Trainer  # heavy (megatron): after validation

    try:
        trainer = Trainer(experiment, resolved_config=data)
    except (ConfigError, CheckpointError) as err:  # layout checks; a missing/bad/mismatched checkpoint
        print(err, file=sys.stderr)
        sys.exit(2)
    try:
        history = trainer.run()
    except TrainingHalted as err:
        print(err, file=sys.stderr)
        sys.exit(EXIT_HALTED)
    if trainer.rank == 0:
        last = next((h for h in reversed(history) if "loss" in h), {})
        evals = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
        summary = f"[done] step {trainer.step}; final train loss {last.get('loss', float('nan')):.4f}"
        if evals:
            (first_step, first), (last_step, final) = evals[0], evals[-1]
            summary += f"; val_loss {first:.4f} (step {first_step}) -> {final:.4f} (step {last_step})"
        print(summary, flush=True)
        print(f"[done] run dir: {experiment.run.dir} (config.yaml, metrics.jsonl)", flush=True)
    if trainer.exit_code:  # 75: pre-empted / out of time, checkpoint saved (launch/slurm.sbatch requeues)
        sys.exit(trainer.exit_code)


# Printed by every rank on every resume or expert-parallel run, and not ours to fix: megatron-core
# 0.16's torch_dist loader calls torch.distributed.checkpoint.load_state_dict and builds
# ShardedTensors, and its sequence-parallel gather (alltoall dispatcher, ep > 1) calls
# all_gather_into_tensor, all deprecated by torch. Exactly these messages are silenced; any other
# warning still shows.
_THIRD_PARTY_DEPRECATIONS = (
    r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead\.",
    r"Please use DTensor instead and we are deprecating ShardedTensor\.",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. Please use "
    r"`torch\.distributed\.all_gather_single` instead\.",
)

_WAIT_POLICY = None  # what main() could set before torch loaded (None: too late, or run without main)


def main() -> None:
    import warnings

    from rexmoe_train.threads import prefer_passive_wait

    global _WAIT_POLICY
    _WAIT_POLICY = prefer_passive_wait()  # before anything imports torch: its OpenMP runtime reads it once
    for message in _THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    _main()


if __name__ == "__main__":
    main()
