"""Read and write training checkpoints (rexmoe_train/checkpoint's layout) in ONE process, for the
converters. dist_checkpointing reshards on load, so a checkpoint saved in any parallel layout loads
into the 1-process model here; and a model-only checkpoint written here is what `rexmoe-train
checkpoint.load=...` starts from.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from rexmoe_train import compat

compat.require_installed()  # megatron-facing: entry points install the CPU layer first

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rexmoe_train.checkpoint import compatibility, layout  # noqa: E402
from rexmoe_train.checkpoint.errors import CheckpointError  # noqa: E402
from rexmoe_train.config.schema import ConfigError, ExperimentConfig, ParallelConfig, experiment_from_dict  # noqa: E402
from rexmoe_train.convert.hf_format import ConvertError  # noqa: E402
from rexmoe_train.model.gpt import ReXMoEModel, build_model  # noqa: E402
from rexmoe_train.parallel.state import init_distributed, init_model_parallel  # noqa: E402
from rexmoe_train.tools.outputs import OutputError, write_dir  # noqa: E402


def resolve(path: Path) -> Path:
    """A checkpoint root (with the pointer file) or an iter_* directory -> the iter_* directory."""
    if not path.exists():
        raise ConvertError(f"{path}: no such checkpoint directory")
    if (path / layout.TRACKER).exists():
        try:
            return path / layout.iter_name(layout.read_tracker(path))
        except CheckpointError as err:
            raise ConvertError(str(err)) from None
    if (path / layout.META).exists():
        return path
    raise ConvertError(f"{path}: not a ReXMoE checkpoint (neither {layout.TRACKER} nor {layout.META} found)")


def read_checkpoint_config(iter_dir: Path) -> tuple[ExperimentConfig, dict]:
    try:  # verifies every file's digest (and the signature) before anything below unpickles one
        meta = layout.read_metadata(iter_dir)
    except CheckpointError as err:
        raise ConvertError(str(err)) from None
    try:
        data = OmegaConf.to_container(OmegaConf.load(iter_dir / layout.CONFIG), resolve=True)
        cfg = experiment_from_dict(data)
    except (OSError, ConfigError, ValueError, Exception) as err:  # noqa: BLE001 - yaml's errors too
        raise ConvertError(f"{iter_dir / layout.CONFIG}: unusable config ({err})") from None
    return cfg, meta


def single_process(cfg: ExperimentConfig, bf16: bool = False) -> ExperimentConfig:
    """The same model in a 1-process layout and the default dispatcher; fp32 unless ``bf16`` (which
    halves the memory: a 7B model is ~28 GiB in fp32, ~14 GiB in bf16)."""
    train = dataclasses.replace(cfg.train, bf16=bf16)
    return dataclasses.replace(cfg, parallel=ParallelConfig(), train=train)


def build_single_process(cfg: ExperimentConfig, vocab_size: int) -> ReXMoEModel:
    init_distributed()
    compat.reset_megatron_global_state()
    init_model_parallel(cfg.parallel, cfg.train.seed)
    return build_model(cfg, vocab_size)


def load_model(path: Path, bf16: bool = False) -> tuple[ExperimentConfig, ReXMoEModel, dict]:
    """Load a checkpoint's model into one process. Returns (1-process config, model, metadata)."""
    iter_dir = resolve(path)
    saved_cfg, meta = read_checkpoint_config(iter_dir)
    cfg = single_process(saved_cfg, bf16)
    vocab = int(meta["model"]["model.vocab_size"])
    model = build_single_process(cfg, vocab)
    chunk = model.chunks[0]
    sharded = {"model": chunk.sharded_state_dict(metadata=compatibility.sharding_metadata(cfg))}
    loaded = read_verified(sharded, iter_dir)
    chunk.load_state_dict(loaded["model"], strict=False)
    model.psr_state.set_step(meta["step"])
    return cfg, model, meta


def read_verified(sharded: dict, iter_dir: Path) -> dict:
    """dist_checkpointing.load after read_checkpoint_config verified the files; what still fails
    (torch's CheckpointException derives from BaseException) becomes one ConvertError line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded, str(iter_dir))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - one line, not a traceback
        line = " ".join(str(err).split())[:400]
        raise ConvertError(f"{iter_dir} could not be loaded: {type(err).__name__}: {line}") from None


def open_streamed(path: Path, bf16: bool = False):
    """A checkpoint's model for the converters WITHOUT building it: (1-process config,
    StreamedCheckpoint, metadata). Tensors are read from the files one part (layer, expert bank,
    embeddings) at a time when asked for; the optimizer state is never read."""
    from rexmoe_train.convert.dcp_reader import StreamedCheckpoint
    from rexmoe_train.model.gpt import padded_vocab_size

    iter_dir = resolve(path)
    saved_cfg, meta = read_checkpoint_config(iter_dir)
    cfg = single_process(saved_cfg, bf16)
    vocab = int(meta["model"]["model.vocab_size"])
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1)
    return cfg, StreamedCheckpoint(iter_dir, cfg, padded), meta


def save_model(cfg: ExperimentConfig, model: ReXMoEModel, vocab_size: int, out: Path, *, step: int,
               source: str, overwrite: bool = False, owner: str = "rexmoe-convert import-hf") -> Path:
    """A model-only checkpoint (no optimizer state): `rexmoe-train checkpoint.load=OUT` starts from
    it with a fresh optimizer at step ``step``. Written aside and renamed; ``overwrite`` replaces
    only an earlier output of ``owner`` (tools/outputs.py)."""

    def write(tmp: Path) -> None:
        iter_dir = tmp / layout.iter_name(step)
        iter_dir.mkdir()
        chunk = model.chunks[0]
        dist_checkpointing.save({"model": chunk.sharded_state_dict(metadata=compatibility.sharding_metadata(cfg))},
                                str(iter_dir), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
        (iter_dir / layout.CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
        meta = {
            "format": layout.FORMAT_VERSION,
            "step": step,
            "model_only": True,
            "source": source,
            "model": compatibility.model_signature(cfg, vocab_size),
            "padded_vocab_size": model.vocab_size,
            "parallel": compatibility.parallel_signature(cfg, 1),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "megatron_backend": "torch_dist",
        }
        # content digests (and a signature with REXMOE_CHECKPOINT_KEY set): a converted checkpoint is
        # verified on load like a trained one
        layout.write_manifest(iter_dir, meta)
        (tmp / layout.TRACKER).write_text(f"{step}\n")

    try:
        return write_dir(out, owner, overwrite, write)
    except OutputError as err:
        raise ConvertError(str(err)) from None


def describe_meta(meta: dict, step_override: Optional[int] = None) -> str:
    par = meta["parallel"]
    return (f"step {step_override or meta['step']}, saved with world size {par['world_size']} "
            f"(tp={par['tensor_model_parallel_size']} pp={par['pipeline_model_parallel_size']} "
            f"ep={par['expert_model_parallel_size']}), "
            f"{'model only' if meta.get('model_only') else 'model + optimizer'}")
