"""Write a ReXMoE model as a stock Hugging Face Qwen2-MoE folder (unrolled) or as a compact folder.

Streaming: tensors are produced and written one decoder layer at a time (one safetensors shard per
layer). The source is either a 1-process state dict (the whole model in memory) or a
:class:`~rexmoe_train.convert.dcp_reader.StreamedCheckpoint`, which reads each layer (and its reuse
group's expert bank) from the checkpoint files only when that layer is written: peak memory is then
one layer plus the embeddings, whatever the depth (docs/benchmarks.md, "Checkpoint conversion memory").
Both sources give bitwise-identical files (tests/convert/test_dcp_reader.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.convert.hf_format import (
    ConvertError,
    check_exportable,
    hf_config,
    hf_layer_tensors,
    hf_outer_tensors,
)

EXPORT_META = "rexmoe_export.json"


def bank_experts(state: dict, group_index: int, num_candidates: int) -> list:
    """(fc1, fc2) of a group's experts in candidate order (1-process model: slot == candidate)."""
    prefix = f"expert_banks.banks.{group_index}.local_experts"
    return [(state[f"{prefix}.{c}.linear_fc1.weight"], state[f"{prefix}.{c}.linear_fc2.weight"])
            for c in range(num_candidates)]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _write_shards(out: Path, shards: Iterable[tuple[str, Iterable]], total: int,
                  progress: bool, dtype: Optional[torch.dtype] = None) -> dict:
    """Write each (label, tensors) as one safetensors file. ``shards`` may be lazy: a streamed source
    reads a part only when its shard is written, and nothing of a shard outlives its file."""
    from tqdm import tqdm  # here, not at module level: importing rexmoe_train must not need tqdm

    weight_map, written = {}, 0
    bar = tqdm(total=total, desc="export", unit="shard", disable=not progress)
    try:
        for index, (label, tensors) in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            bar.set_postfix_str(f"{label}, {_human(written)} written", refresh=True)
            # clone: safetensors refuses views that share storage (gate/up halves of one fc1)
            block = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)
                     .contiguous().clone() for k, v in tensors}
            del tensors
            save_file(block, str(out / name), metadata={"format": "pt", "part": label})
            for key in block:
                weight_map[key] = name
            del block
            written += (out / name).stat().st_size
            bar.set_postfix_str(f"{label}, {_human(written)} written", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return weight_map


def _write_index(folder: Path, weight_map: dict) -> None:
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True))


def _atomic_dir(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write into a sibling temp dir, then rename: a failed export leaves nothing half-written."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"output directory {out} exists and is not empty (pass --overwrite)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class DictSource:
    """A whole 1-process state dict, served in the parts a StreamedCheckpoint serves."""

    def __init__(self, state: dict) -> None:
        self.state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}

    @staticmethod
    def part_of(key: str) -> str:
        if key.startswith("decoder.layers."):
            return f"layer {key.split('.')[2]}"
        if key.startswith("expert_banks.banks."):
            return f"bank {key.split('.')[2]}"
        return "outer"

    def load_part(self, part: str) -> dict:
        return {k: v for k, v in self.state.items() if self.part_of(k) == part}

    def keys(self) -> list[str]:
        return list(self.state)

    def load(self, keys) -> dict:
        return {k: self.state[k] for k in keys}


def as_source(state):
    """A state dict or a StreamedCheckpoint -> something with ``load_part(part)``."""
    return state if hasattr(state, "load_part") else DictSource(state)


def _compact_shards(cfg: ExperimentConfig, keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(label, keys) of the compact export's shards: embeddings + final norm + head, each decoder
    layer, then each reuse group's experts split by owner MoE layer (N experts a shard), so a shard
    stays about one layer's worth of tensors however large r makes a bank."""
    plan = cfg.reuse_plan()
    n = cfg.model.num_moe_experts
    labels = ["embeddings+head"] + [f"layer {i}" for i in range(cfg.model.num_layers)]
    for group in plan.groups:
        labels += [f"bank {group.index} experts of MoE layer {group.first_moe_layer + j}" for j in range(group.size)]
    shards: dict[str, list[str]] = {label: [] for label in labels}
    for key in keys:
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            label = f"layer {parts[2]}"
        elif key.startswith("expert_banks.banks."):
            group = plan.groups[int(parts[2])]
            label = f"bank {group.index} experts of MoE layer {group.first_moe_layer + int(parts[4]) // n}"
        else:
            label = "embeddings+head"
        shards[label].append(key)
    return [(label, names) for label, names in shards.items() if names]


def export_hf(cfg: ExperimentConfig, state, vocab_size: int, out: Path, *,
              tokenizer_vocab_size: Optional[int] = None, tokenizer_file: Optional[Path] = None,
              source: str = "", overwrite: bool = False, progress: bool = True) -> Path:
    """Unrolled Qwen2-MoE export of a 1-process ReXMoE state dict (PSR fully open).

    ``state``: the 1-process state dict, or a StreamedCheckpoint (reads one layer at a time).
    ``vocab_size`` is the (padded) embedding size; ``tokenizer_vocab_size`` the tokenizer's, which
    a later import-hf needs to give the training checkpoint the same signature."""
    check_exportable(cfg)
    config = hf_config(cfg, vocab_size)
    plan = cfg.reuse_plan()
    src = as_source(state)

    def shards():
        yield "embeddings+head", hf_outer_tensors(cfg, src.load_part("outer"))
        bank_index, bank = None, None
        for layer in range(cfg.model.num_layers):
            experts = []
            if plan.is_moe_layer(layer + 1):
                group = plan.group_of(plan.moe_index(layer + 1))
                if bank_index != group.index:
                    bank_index, bank = None, None  # free the previous group's bank before reading
                    bank_index, bank = group.index, src.load_part(f"bank {group.index}")
                experts = bank_experts(bank, group.index, group.num_candidates)
            yield f"layer {layer}", hf_layer_tensors(cfg, src.load_part(f"layer {layer}"), layer, experts)
            experts = None

    def write(tmp: Path) -> None:
        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        total = 1 + cfg.model.num_layers
        _write_index(tmp, _write_shards(tmp, shards(), total, progress, dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        meta = _export_meta(cfg, source, compact=False) | {"vocab_size": tokenizer_vocab_size or vocab_size}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")

    return _atomic_dir(out, write, overwrite)


def export_compact(cfg: ExperimentConfig, state, vocab_size: int, out: Path, *, source: str = "",
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Our own parameter names, each expert once, plus the resolved config: loadable by import-hf.

    In the model's dtypes, one shard per part (see _compact_shards); ``state`` as for
    :func:`export_hf`."""
    src = as_source(state)
    plan = _compact_shards(cfg, src.keys())

    def write(tmp: Path) -> None:
        shards = ((label, src.load(keys).items()) for label, keys in plan)
        _write_index(tmp, _write_shards(tmp, shards, len(plan), progress))
        (tmp / EXPORT_META).write_text(json.dumps(
            _export_meta(cfg, source, compact=True) | {"vocab_size": vocab_size}, indent=2))

    return _atomic_dir(out, write, overwrite)


def _export_meta(cfg: ExperimentConfig, source: str, compact: bool) -> dict:
    import dataclasses

    target = "qwen3_moe" if cfg.model.qk_layernorm else "qwen2_moe"
    return {"format": "rexmoe-compact" if compact else f"{target}-unrolled", "source": source,
            "experiment": dataclasses.asdict(cfg)}


def load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if not index.exists():
        raise ConvertError(f"{folder}: no model.safetensors.index.json (not an export of ours)")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as err:
        raise ConvertError(f"{index}: unreadable index ({err.__class__.__name__})") from None
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except Exception as err:  # truncated / corrupt file: safetensors raises its own errors
            raise ConvertError(f"{folder / name}: cannot read safetensors ({err})") from None
    return tensors
