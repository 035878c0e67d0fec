"""Read a training checkpoint's model tensors a few at a time, straight from its torch_dist files.

``checkpoint_io.load_model`` builds the whole 1-process model and loads every tensor into it: peak
memory is the full model in fp32 (a 7B-class ReXMoE does not fit in 24 GiB). The converters only
need one decoder layer (plus its reuse group's expert bank) at a time, so this module reads exactly
that: :class:`StreamedCheckpoint` presents the checkpoint as the 1-process model's state dict, split
into parts (``outer`` = embeddings, final norm, output layer; ``layer i``; ``bank g``), and loads one
part at a time into freshly allocated tensors. Nothing builds the megatron model and nothing touches
the optimizer state.

How a 1-process state-dict key maps to what megatron wrote (``iter_*/.metadata``; the reader always
sees GLOBAL tensors, whatever tp/ep/pp layout saved them):

- ``decoder.layers.<i>.<name>`` -> ``decoder.layers.<saved name>``, global shape ``[num_layers, ...]``,
  index ``i`` (megatron stacks homogeneous layers); ``<saved name>`` applies the layer spec's
  ``sharded_state_dict_keys_map`` (the local spec saves ``input_layernorm.weight`` as
  ``self_attention.linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm.weight`` as
  ``mlp.linear_fc1.layer_norm_weight``, TE-compatible names). Non-homogeneous layers are saved
  unstacked as ``decoder.layers.<i>.<saved name>``: both are recognised.
- ``expert_banks.banks.<g>.local_experts.<slot>.linear_fc{1,2}.weight`` ->
  ``expert_banks.experts.linear_fc{1,2}.weight``, global shape ``[num_moe_layers, N, ...]``, index
  (owner MoE layer, expert) of the slot in the 1-process placement (rexmoe_train/model/experts.py). The
  SwiGLU ``fc1`` is saved as two halves (gate rows, then up rows, each split over tp) that together
  form the global ``[gate; up]`` tensor: exactly the 1-process parameter.
- anything else (``embedding.word_embeddings.weight``, ``decoder.final_layernorm.weight``,
  ``output_layer.weight``): the same key. A vocabulary padded for a larger tp is cut to the
  1-process padded size (the extra rows are padding).

Dtypes follow the 1-process model ``load_model`` builds: weights in the model dtype (fp32, or bf16
with ``bf16=True``), norm weights always fp32 (torch norm modules). Values pass through the same
casts as loading into that model, so exports are bitwise identical (tests/convert/test_dcp_reader.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.convert.hf_format import ConvertError

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "expert_banks.")
BANK_KEY = "expert_banks.experts."
# the local layer spec's sharded_state_dict_keys_map (megatron's get_gpt_layer_local_spec); used
# when the spec cannot be asked (see _layer_keys_maps)
DEFAULT_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


@dataclass(frozen=True)
class Region:
    """A block of a saved global tensor: ``index`` picks along the leading dims (which the result
    drops); ``rows`` (optional) keeps only the first rows of the first remaining dim."""

    key: str
    index: tuple[int, ...] = ()
    rows: Optional[int] = None


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, length)
    return tensor


class _IntoBuffers(LoadPlanner):
    """The part of a LoadPlanner that FileSystemReader.read_data uses: where each read goes."""

    def __init__(self, buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.buffers = buffers

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - unused
        pass

    def create_local_plan(self) -> LoadPlan:  # pragma: no cover - unused
        raise NotImplementedError

    def create_global_plan(self, global_plan):  # pragma: no cover - unused
        return global_plan

    def finish_plan(self, central_plan):  # pragma: no cover - unused
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:  # pragma: no cover - never asked
        raise ConvertError(f"unexpected non-tensor read of {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        index = read_item.dest_index
        return _narrow(self.buffers[(index.fqn, tuple(index.offset))], read_item.dest_offsets,
                       read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read straight into the buffer


class DcpReader:
    """Blocks of the tensors of a torch_dist checkpoint directory (``iter_*``), read on demand. Only
    the saved chunks that overlap a requested block are read (one chunk at a time)."""

    def __init__(self, iter_dir: Path) -> None:
        self.path = Path(iter_dir)
        self._storage = FileSystemReader(str(self.path))
        try:
            self.metadata = self._storage.read_metadata()
        except FileNotFoundError:
            raise ConvertError(f"{self.path}: no .metadata (not a torch_dist checkpoint)") from None
        except Exception as err:  # truncated / corrupt pickle
            raise ConvertError(f"{self.path / '.metadata'}: unreadable ({err.__class__.__name__}: {err})") from None
        self._storage.set_up_storage_reader(self.metadata, True)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._buckets: dict[str, dict[int, list[ChunkStorageMetadata]]] = {}

    def _candidates(self, key: str, region: Region) -> TensorStorageMetadata:
        """The saved chunks that may overlap ``region``: a stacked expert tensor of a large model has
        tens of thousands of chunks, and the overlap search is linear in the chunks it is given."""
        md = self.tensors[key]
        if not region.index:
            return md
        if key not in self._buckets:
            buckets: dict[int, list[ChunkStorageMetadata]] = {}
            for chunk in md.chunks:
                for i in range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]):
                    buckets.setdefault(i, []).append(chunk)
            self._buckets[key] = buckets
        return TensorStorageMetadata(md.properties, md.size, self._buckets[key].get(region.index[0], []))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, regions: dict[str, Region]) -> dict[str, torch.Tensor]:
        """name -> Region  =>  name -> tensor (saved dtype). One pass over the files."""
        buffers, items, out = {}, [], {}
        for name, region in regions.items():
            md = self.tensors[region.key]
            shape = tuple(md.size)
            lead = len(region.index)
            rest = list(shape[lead:])
            if region.rows is not None:
                rest[0] = region.rows
            offsets = (*region.index, *([0] * len(rest)))
            sizes = (*([1] * lead), *rest)
            slot = (region.key, offsets)
            if slot not in buffers:
                buffers[slot] = torch.empty(sizes, dtype=md.properties.dtype)
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items += create_read_items_for_chunk_list(region.key, self._candidates(region.key, region), [chunk])
            out[name] = buffers[slot].view(rest)
        if items:
            plan = self._storage.prepare_local_plan(LoadPlan(items))
            plan = self._storage.prepare_global_plan([plan])[0]
            try:
                self._storage.read_data(plan, _IntoBuffers(buffers)).wait()
            except Exception as err:  # a damaged chunk: torch.load / zip / unpickling errors
                first = next(iter(regions.values())).key
                why = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ConvertError(f"{self.path}: cannot read {first} and {len(regions) - 1} more tensors "
                                   f"({err.__class__.__name__}: {why})") from None
        return out


def _layer_keys_maps(cfg: ExperimentConfig) -> list[dict[str, str]]:
    """Per layer: the spec's sharded_state_dict_keys_map (local name prefix -> saved name prefix)."""
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        m = cfg.model
        plan = cfg.reuse_plan()
        maps = []
        for layer_number in range(1, m.num_layers + 1):
            spec = get_gpt_layer_local_spec(
                num_experts=m.num_moe_experts if plan.is_moe_layer(layer_number) else None,
                moe_grouped_gemm=False, normalization=m.normalization, qk_layernorm=m.qk_layernorm)
            maps.append(dict(spec.submodules.sharded_state_dict_keys_map or {}))
        return maps
    except Exception:  # pragma: no cover - another megatron: its local spec's well-known map
        return [dict(DEFAULT_KEYS_MAP)] * cfg.model.num_layers


def _to_local(name: str, keys_map: dict[str, str]) -> str:
    for local, saved in keys_map.items():
        if name.startswith(saved):
            return local + name[len(saved):]
    return name


def is_norm(key: str) -> bool:
    """Norm weights: torch norm modules, fp32 even in a bf16 model."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2].endswith("norm")


class StreamedCheckpoint:
    """A checkpoint's model as the 1-process state dict, loaded one part at a time.

    ``cfg`` is the 1-process config (checkpoint_io.single_process); ``padded_vocab`` the 1-process
    padded vocabulary size (what ``build_single_process`` would give the embedding)."""

    def __init__(self, iter_dir: Path, cfg: ExperimentConfig, padded_vocab: int) -> None:
        from rexmoe_train.core.placement import ExpertPlacement

        self.cfg = cfg
        self.padded_vocab = padded_vocab
        self.reader = DcpReader(iter_dir)
        self.plan = cfg.reuse_plan()
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        m = cfg.model
        maps = _layer_keys_maps(cfg)
        self.regions: dict[str, Region] = {}
        self.parts: dict[str, list[str]] = {"outer": []}
        for i in range(m.num_layers):
            self.parts[f"layer {i}"] = []
        for group in self.plan.groups:
            self.parts[f"bank {group.index}"] = []

        stacked = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
        for key in self.reader.tensors:
            if not key.startswith(MODEL_PREFIXES):
                continue
            shape = self.reader.shape(key)
            if key.startswith(BANK_KEY):
                self._add_bank(key, shape, ExpertPlacement)
            elif (hit := stacked.fullmatch(key)) is not None:  # non-homogeneous layers: one key each
                i = int(hit.group(1))
                self._add(f"layer {i}", f"decoder.layers.{i}.{_to_local(hit.group(2), maps[i])}", Region(key))
            elif key.startswith("decoder.layers."):
                if shape[0] != m.num_layers:
                    raise ConvertError(f"{self.reader.path}: {key} holds {shape[0]} layers, the config has "
                                       f"{m.num_layers}")
                name = key[len("decoder.layers."):]
                for i in range(m.num_layers):
                    self._add(f"layer {i}", f"decoder.layers.{i}.{_to_local(name, maps[i])}", Region(key, (i,)))
            elif key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if shape[0] < padded_vocab or shape[1] != m.hidden_size:
                    raise ConvertError(f"{self.reader.path}: {key} has shape {shape}, the config needs "
                                       f"({padded_vocab}, {m.hidden_size})")
                self._add("outer", key, Region(key, rows=padded_vocab if shape[0] != padded_vocab else None))
            else:
                self._add("outer", key, Region(key))
        missing = [p for p, keys in self.parts.items() if not keys]
        if missing or "embedding.word_embeddings.weight" not in self.regions:
            raise ConvertError(f"{self.reader.path}: no model tensors for {missing[0] if missing else 'outer'} "
                               "(not a ReXMoE model checkpoint?)")

    def _add(self, part: str, local: str, region: Region) -> None:
        self.parts[part].append(local)
        self.regions[local] = region

    def _add_bank(self, key: str, shape: tuple, placement_cls) -> None:
        param = key[len(BANK_KEY):]  # linear_fc1.weight
        num_moe, n = shape[0], shape[1]
        if num_moe != self.plan.num_moe_layers or n != self.cfg.model.num_moe_experts:
            raise ConvertError(f"{self.reader.path}: {key} holds [{num_moe}, {n}] experts, the config has "
                               f"[{self.plan.num_moe_layers}, {self.cfg.model.num_moe_experts}]")
        for group in self.plan.groups:
            placement = placement_cls(group.experts_per_layer, group.size, 1)
            for slot in range(group.num_candidates):
                owner, expert = placement.slot_owner_expert(0, slot)
                self._add(f"bank {group.index}", f"expert_banks.banks.{group.index}.local_experts.{slot}.{param}",
                          Region(key, (group.first_moe_layer + owner, expert)))

    def keys(self) -> list[str]:
        return [k for keys in self.parts.values() for k in keys]

    def target_dtype(self, key: str) -> torch.dtype:
        return torch.float32 if is_norm(key) else self.dtype

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """These local keys, as the 1-process model would hold them after loading the checkpoint."""
        keys = list(keys)
        raw = self.reader.read({k: self.regions[k] for k in keys})
        out = {}
        for k in keys:
            t = raw.pop(k)
            dtype = self.target_dtype(k)
            out[k] = t if t.dtype == dtype else t.to(dtype)
        return out

    def load_part(self, part: str) -> dict[str, torch.Tensor]:
        return self.load(self.parts[part])
