"""Write a ReXMoE model as a stock Hugging Face Qwen2-MoE folder (unrolled) or as a compact folder.

Streaming: tensors are produced and written one decoder layer at a time (one safetensors shard per
layer), so peak memory is the source model plus one unrolled layer, not the unrolled model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.convert.hf_format import (
    ConvertError,
    check_exportable,
    hf_config,
    hf_layer_tensors,
    hf_outer_tensors,
)
from rexmoe_train.model.reuse import ReusePlan

EXPORT_META = "rexmoe_export.json"


def bank_experts(state: dict, group_index: int, num_candidates: int) -> list:
    """(fc1, fc2) of a group's experts in candidate order (1-process model: slot == candidate)."""
    prefix = f"expert_banks.banks.{group_index}.local_experts"
    return [(state[f"{prefix}.{c}.linear_fc1.weight"], state[f"{prefix}.{c}.linear_fc2.weight"])
            for c in range(num_candidates)]


def _write_shards(out: Path, shards: Iterable[tuple[str, Iterable]], total: int,
                  progress: bool, dtype: Optional[torch.dtype] = None) -> dict:
    weight_map, names = {}, []
    for index, (label, tensors) in enumerate(tqdm(shards, total=total, desc="export", unit="shard",
                                                  disable=not progress)):
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        # clone: safetensors refuses views that share storage (gate/up halves of one fc1)
        block = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)
                 .contiguous().clone() for k, v in tensors}
        save_file(block, str(out / name), metadata={"format": "pt", "part": label})
        for key in block:
            weight_map[key] = name
        names.append(name)
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


def export_hf(cfg: ExperimentConfig, state: dict, vocab_size: int, out: Path, *,
              tokenizer_vocab_size: Optional[int] = None, tokenizer_file: Optional[Path] = None,
              source: str = "", overwrite: bool = False, progress: bool = True) -> Path:
    """Unrolled Qwen2-MoE export of a 1-process ReXMoE state dict (PSR fully open).

    ``vocab_size`` is the (padded) embedding size; ``tokenizer_vocab_size`` the tokenizer's, which
    a later import-hf needs to give the training checkpoint the same signature."""
    check_exportable(cfg)
    config = hf_config(cfg, vocab_size)
    plan = ReusePlan.from_config(cfg)

    def layer_shard(layer: int):
        experts = []
        if plan.is_moe_layer(layer + 1):
            group = plan.group_of(plan.moe_index(layer + 1))
            experts = bank_experts(state, group.index, group.num_candidates)
        return hf_layer_tensors(cfg, state, layer, experts)

    shards = [("embeddings+head", hf_outer_tensors(cfg, state))]
    shards += [(f"layer {i}", layer_shard(i)) for i in range(cfg.model.num_layers)]

    def write(tmp: Path) -> None:
        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        _write_index(tmp, _write_shards(tmp, shards, len(shards), progress, dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        meta = _export_meta(cfg, source, compact=False) | {"vocab_size": tokenizer_vocab_size or vocab_size}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")

    return _atomic_dir(out, write, overwrite)


def export_compact(cfg: ExperimentConfig, state: dict, vocab_size: int, out: Path, *, source: str = "",
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Our own parameter names, each expert once, plus the resolved config: loadable by import-hf."""

    def write(tmp: Path) -> None:
        tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
        _write_index(tmp, _write_shards(tmp, [("rexmoe", tensors.items())], 1, progress))
        (tmp / EXPORT_META).write_text(json.dumps(
            _export_meta(cfg, source, compact=True) | {"vocab_size": vocab_size}, indent=2))

    return _atomic_dir(out, write, overwrite)


def _export_meta(cfg: ExperimentConfig, source: str, compact: bool) -> dict:
    import dataclasses

    return {"format": "rexmoe-compact" if compact else "qwen2_moe-unrolled", "source": source,
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
