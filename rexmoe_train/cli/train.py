"""`rexmoe-train`: the training entry point. Runs as one process (`rexmoe-train ...`) or under torchrun.

Composes the packaged configs (configs/, shipped as rexmoe_train.configs; ``$REXMOE_CONFIG_DIR`` overrides) with Hydra
overrides from the command line (`model=rexmoe_0.5b rexmoe.reuse_group_size=1 train.train_iters=100`),
validates the result into typed dataclasses before anything is built, then trains.

Exit status: 0 done; 2 a bad value, override, layout or checkpoint (one line on stderr, from rank 0
only under torchrun); 75 pre-empted (SIGTERM/SIGUSR1) or out of time (checkpoint.exit_duration_mins),
checkpoint saved: run again to resume; 3 halted after more than checkpoint.max_skipped_steps
non-finite steps; 130 Ctrl-C (checkpoint saved at the step boundary; a second Ctrl-C stops at once);
129 SIGHUP (a closed terminal: saved at the step boundary, like Ctrl-C; ignored under nohup);
76 a watchdog budget overran (stacks under run.dir/hang/); 77 a peer rank went away; 1 an exception
(one line, the traceback under run.dir/logs/). See docs/reliability.md.

``--cfg`` prints the composed config and exits; ``--check`` validates it (with the layout checks when
``--world-size N`` is given, as launch/torchrun.sh does before starting N processes) and exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Optional

from rexmoe_train.threads import prefer_passive_wait

# Before anything imports torch: its OpenMP runtime reads the wait policy once, when it loads.
_WAIT_POLICY, _WAIT_REASON = prefer_passive_wait()

from rexmoe_train.resilience.signals import EarlySignals  # noqa: E402 (torch-free)

# run as the CLI (not imported by a library or a test): stop signals are recorded from the first second
_EARLY = EarlySignals(install=EarlySignals.is_cli(sys.argv[0]))

from rexmoe_train.config.compose import compose_experiment  # noqa: E402 (after the wait policy)
from rexmoe_train.config.schema import ConfigError, ExperimentConfig  # noqa: E402
from rexmoe_train.exit_codes import ExitCode  # noqa: E402

USAGE = ("usage: rexmoe-train [--cfg | --check [--world-size N]] [KEY=VALUE | GROUP=OPTION ...]\n"
         "  e.g. rexmoe-train model=rexmoe_0.5b rexmoe.reuse_group_size=1 train.train_iters=100\n"
         "  groups: model (tiny, rexmoe_0.5b[_se], rexmoe_2.3b[_se], rexmoe_7b_se), train (tiny_cpu, paper);\n"
         "  every field: rexmoe_train/config/schema.py; docs: README.md")


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fail(message: str, code: int = ExitCode.USAGE) -> None:
    """One line on stderr (rank 0 only: every rank fails alike), then exit. Under torchrun the line is
    also the rank's error file; rexmoe's launcher prints it once, in its summary, instead."""
    from rexmoe_train.resilience.launcher import write_error_file

    handed = write_error_file(message) and bool(os.environ.get("REXMOE_LAUNCHER"))
    if _is_rank0() and not handed:
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def local_attention_memory_warning(experiment: ExperimentConfig, overrides: Sequence[str],
                                   device_bytes: Optional[int] = None) -> Optional[str]:
    """The one-line start-up warning of a GPU without Transformer Engine whose step cannot fit
    (plan/theory.py local_attention_warning); None on a CPU, with TE, or when it may fit.
    ``device_bytes``: the GPU's memory (default: asked of CUDA)."""
    from rexmoe_train import platform
    from rexmoe_train.plan.theory import local_attention_warning

    if experiment.model.resolved_transformer_impl() != "local":
        return None
    if device_bytes is None:
        if not platform.HAS_CUDA:
            return None  # the CPU path: no allocator to run out of, and no GPU to rent
        import torch

        device_bytes = torch.cuda.get_device_properties(platform.device()).total_memory
    try:
        return local_attention_warning(experiment, int(os.environ.get("WORLD_SIZE", "1")), device_bytes,
                                       " ".join(overrides) or "<your overrides>")
    except ConfigError:  # a layout this world cannot hold: the Trainer refuses it in one line
        return None


def dry_run(experiment: ExperimentConfig) -> int:
    """Describe the run without building it: no process group, no megatron, no data read."""
    from rexmoe_train.tools.dry_run import describe

    if experiment.data.source == "embedded":
        from rexmoe_train.data import ByteTokenizer

        vocab = ByteTokenizer().vocab_size
    else:
        from rexmoe_train.data.text_tokenizer import load_tokenizer

        vocab = load_tokenizer(experiment.data.tokenizer).vocab_size
    if experiment.model.vocab_size is not None and experiment.model.vocab_size < vocab:
        if _is_rank0():
            print(f"config error: model.vocab_size={experiment.model.vocab_size}: must be >= the tokenizer's "
                  f"vocabulary ({vocab}), or null to take it from the tokenizer", file=sys.stderr)
        return ExitCode.USAGE
    vocab = experiment.model.vocab_size or vocab
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    if _is_rank0():
        try:
            print(describe(experiment, vocab, world_size=world, bf16=experiment.train.bf16 is not False),
                  flush=True)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return ExitCode.USAGE
    return 0


def _describe_os_error(err: OSError) -> str:
    import errno

    name = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else type(err).__name__
    return f"{err.filename or '(no path)'}: [{name}] {err.strerror or err}"


def _resume_hint(experiment: ExperimentConfig) -> str:
    """What a rerun starts from: the checkpoint the pointer names, else checkpoint.load, else step 0."""
    from rexmoe_train.checkpoint import CheckpointError, layout

    root = layout.save_root(experiment)
    try:
        return f"rerun to resume from {root / layout.iter_name(layout.read_tracker(root))}"
    except CheckpointError:  # no pointer (or an unreadable one): nothing of this run was saved
        load = experiment.checkpoint.load
        return "no checkpoint saved yet: a rerun starts " + (f"again from checkpoint.load={load}" if load
                                                              else "from step 0")


def _parse_flags(argv: list[str]) -> tuple[dict, list[str]]:
    flags = {"cfg": False, "check": False, "world_size": None}
    rest = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        elif arg in ("--cfg", "--cfg=job"):
            flags["cfg"] = True
        elif arg == "--check":
            flags["check"] = True
        elif arg == "--world-size" or arg.startswith("--world-size="):
            value = arg.partition("=")[2] or next(it, "")
            if not value.isdigit() or int(value) < 1:
                _fail(f"config error: --world-size={value!r}: must be an integer >= 1")
            flags["world_size"] = int(value)
        elif arg.startswith("-"):
            _fail(f"rexmoe-train: unknown option {arg!r}; allowed: --cfg, --check, --world-size N, "
                  "-h (everything else is KEY=VALUE)")
        else:
            rest.append(arg)
    return flags, rest


# Printed by every rank on every resume or expert-parallel run, and not ours to fix: megatron-core
# 0.16's torch_dist loader calls torch.distributed.checkpoint.load_state_dict and builds
# ShardedTensors, and its sequence-parallel gather (alltoall dispatcher, ep > 1) calls
# all_gather_into_tensor, all deprecated by torch. Exactly these messages are silenced.
_THIRD_PARTY_DEPRECATIONS = (
    r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead\.",
    r"Please use DTensor instead and we are deprecating ShardedTensor\.",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. Please use "
    r"`torch\.distributed\.all_gather_single` instead\.",
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    for message in _THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from rexmoe_train.resilience.stray_errors import route_stray_errors, set_stray_log, stray_log_path

    route_stray_errors()  # "Exception ignored in ..." and thread tracebacks: to the run's log dir
    flags, overrides = _parse_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        composed = compose_experiment(overrides)
        experiment = composed.experiment.validate(flags["world_size"])
    except ConfigError as err:
        _fail(str(err))
    set_stray_log(stray_log_path(experiment.run.dir))
    if flags["cfg"]:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(composed.resolved)), end="")
        return 0
    if flags["check"]:
        return 0
    if experiment.run.dry_run:
        return dry_run(experiment)
    from rexmoe_train.threads import ThreadsError, set_intra_op_threads

    try:
        choice = set_intra_op_threads(experiment.run.num_threads)
    except ThreadsError as err:
        _fail(str(err))
    if _is_rank0():
        print(f"[threads] intra-op threads: {choice.threads} ({choice.reason}; {_WAIT_REASON})", flush=True)

    import time

    # Stop signals are recorded from here on (from the first second when run as the CLI), before the
    # slow imports below (megatron: seconds), and handed to the Trainer, which takes the save-and-exit
    # path before its first evaluation and step. (training.guard needs the compat layer: a bridge.)
    ck = experiment.checkpoint
    from rexmoe_train.resilience.attempts import attempt_dir

    # where this rank's output goes once its terminal hangs up (SIGHUP; training/guard.py)
    _EARLY.hangup_output = str(attempt_dir(experiment.run.dir, "logs") / f"rank{os.environ.get('RANK', '0')}.out")
    if ck.exit_signal_handler:
        _EARLY.install()
    else:
        _EARLY.uninstall()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: die with the agent, never outlive it
        from rexmoe_train.resilience.attempts import die_with_parent

        die_with_parent()
    import logging
    import warnings

    from rexmoe_train import compat

    compat.install()  # the megatron-core CPU layer, before the first megatron import
    warning = local_attention_memory_warning(experiment, overrides) if _is_rank0() else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from rexmoe_train.training import guard

    # torch.distributed.checkpoint's own deprecation warnings (ShardedTensor) on every save and load;
    # and megatron's async writer logs a failed write before raising it, which the save turns into
    # its one error line (checkpoint/manager.py): without a handler Python would print it too
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").addHandler(
        logging.NullHandler())

    signals = guard.StopSignals(ck.exit_signal_handler, ck.exit_duration_mins, time.monotonic())
    signals.hangup_output = _EARLY.hangup_output
    signals.install()  # replaces the bridge with no gap (uninstalling puts the bridge back: harmless)
    signals.record(_EARLY.take())
    from rexmoe_train.checkpoint import CheckpointError
    from rexmoe_train.training.trainer import Trainer  # heavy (megatron): after validation

    trainer = None
    try:
        try:
            trainer = Trainer(experiment, resolved_config=composed.resolved, signals=signals)
        except (ConfigError, CheckpointError) as err:  # layout checks; a missing/bad/mismatched checkpoint
            _fail(str(err))
        except OSError as err:  # a full disk or unwritable run dir while starting: one line naming it
            _fail(f"error: {_describe_os_error(err)}")
        try:
            history = trainer.run()
        except guard.TrainingHalted as err:
            _fail(str(err), ExitCode.HALTED)
        except CheckpointError as err:  # a save that failed (ENOSPC...): the previous checkpoint stands
            _fail(str(err))
        except OSError as err:
            _fail(f"error: {_describe_os_error(err)}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without the traceback
        if _is_rank0():
            print(f"rexmoe-train: stopped at once (second Ctrl-C) at step {trainer.step if trainer else 0}; "
                  f"{_resume_hint(experiment)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(ExitCode.INTERRUPTED)
    except Exception as err:  # noqa: BLE001 -- anything else: one line, the traceback in run.dir/logs
        from rexmoe_train.resilience.failures import record_crash

        code = record_crash(err, experiment.run.dir, int(os.environ.get("RANK", "0")),
                            trainer.step if trainer else None)
        sys.stdout.flush()
        sys.stderr.flush()
        # WHY os._exit: peers may be gone; interpreter teardown would block on their process groups
        os._exit(code)
    if trainer.rank == 0:
        last = next((h for h in reversed(history) if "loss" in h), None)
        evals = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
        if last is None:
            summary = f"[done] step {trainer.step}; no step trained (already at train.train_iters)"
        else:
            summary = f"[done] step {trainer.step}; final train loss {last['loss']:.4f}"
        if evals:
            (first_step, first), (last_step, final) = evals[0], evals[-1]
            summary += f"; val_loss {first:.4f} (step {first_step}) -> {final:.4f} (step {last_step})"
        print(summary, flush=True)
        print(f"[done] run dir: {experiment.run.dir} (config.yaml, metrics.jsonl)", flush=True)
    return trainer.exit_code  # 75: pre-empted / out of time, checkpoint saved (slurm.sbatch requeues)


if __name__ == "__main__":
    sys.exit(main())
