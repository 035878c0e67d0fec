"""Reuse groups: which MoE layers share a candidate pool, and what each candidate is.

Indexing (spec §2): MoE layers are numbered from 0 in model order, dense layers excluded. Group g is
MoE layers [g*r, (g+1)*r) (the last group may be smaller with ``allow_partial_last_group``).
Candidate c of any router in group g is expert ``c % N`` owned by MoE layer ``g*r + c // N``. Every
router of a group sees the same candidate space, so candidate c *is* a physical expert of the group:
this is what lets group-pooled balancing simply add the routers' per-candidate loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rexmoe_train.core.errors import ConfigError


@dataclass(frozen=True)
class ReuseGroup:
    index: int
    first_moe_layer: int
    size: int  # r for full groups
    experts_per_layer: int  # N

    @property
    def num_candidates(self) -> int:
        return self.size * self.experts_per_layer

    @property
    def moe_layers(self) -> range:
        return range(self.first_moe_layer, self.first_moe_layer + self.size)

    def candidate(self, c: int) -> tuple[int, int]:
        """Candidate index -> (owner MoE layer, expert index within the owner)."""
        if not 0 <= c < self.num_candidates:
            raise IndexError(f"candidate {c} outside [0, {self.num_candidates}) of group {self.index}")
        return self.first_moe_layer + c // self.experts_per_layer, c % self.experts_per_layer

    def local_candidates(self, moe_layer: int) -> range:
        """The candidates a layer owns itself (its vanilla experts)."""
        j = moe_layer - self.first_moe_layer
        return range(j * self.experts_per_layer, (j + 1) * self.experts_per_layer)


@dataclass(frozen=True)
class ReusePlan:
    num_layers: int  # all transformer layers
    first_k_dense_layers: int
    reuse_group_size: int
    experts_per_layer: int
    allow_partial_last_group: bool = False

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    @property
    def groups(self) -> list[ReuseGroup]:
        r, n = self.reuse_group_size, self.num_moe_layers
        return [ReuseGroup(g, start, min(r, n - start), self.experts_per_layer)
                for g, start in enumerate(range(0, n, r))]

    def is_moe_layer(self, layer_number: int) -> bool:
        """``layer_number`` is megatron's global 1-based transformer layer number."""
        return layer_number > self.first_k_dense_layers

    def moe_index(self, layer_number: int) -> int:
        if not self.is_moe_layer(layer_number):
            raise ValueError(f"layer {layer_number} is dense (first_k_dense_layers="
                             f"{self.first_k_dense_layers})")
        return layer_number - 1 - self.first_k_dense_layers

    def group_of(self, moe_layer: int) -> ReuseGroup:
        return self.groups[moe_layer // self.reuse_group_size]

    def check_pipeline_split(self, pp: int, vpp: Optional[int] = None, first: Optional[int] = None,
                             last: Optional[int] = None) -> None:
        """All layers of a group must live in one model chunk: an expert split across pipeline stages
        would need its gradient synchronised across stages. Every chunk boundary of megatron's split
        (pipeline_chunks) must fall on a group boundary."""
        chunks = pipeline_chunks(self.num_layers, pp, vpp, first, last)
        for index, (stage, boundary, _) in enumerate(chunks[1:], start=1):
            moe_boundary = boundary - self.first_k_dense_layers  # MoE layers before this chunk
            if moe_boundary <= 0 or moe_boundary >= self.num_moe_layers:
                continue
            group = self.group_of(moe_boundary - 1)
            if moe_boundary < group.first_moe_layer + group.size:
                raise ConfigError(
                    f"config error: parallel.pipeline_model_parallel_size={pp}: pipeline stage "
                    f"{stage} (model chunk {index}) would start at layer {boundary + 1}, inside reuse "
                    f"group {group.index} (MoE layers {group.first_moe_layer}.."
                    f"{group.first_moe_layer + group.size - 1}); stage boundaries must fall on "
                    f"multiples of rexmoe.reuse_group_size={self.reuse_group_size} MoE layers "
                    f"(layers per chunk: {[count for _, _, count in chunks]})")


def pipeline_chunks(num_layers: int, pp: int, vpp: Optional[int] = None, first: Optional[int] = None,
                    last: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(pipeline stage, first layer (0-based), layer count) of every model chunk, in model order:
    megatron's split (get_transformer_layer_offset / get_num_layers_to_build), computed without
    building anything so configs are checked before megatron is imported.

    Even: num_layers / (pp * vpp) per chunk. Uneven (first / last = num_layers_in_first/last_
    pipeline_stage): those stages hold first / last layers (first / vpp per chunk), the other
    ("middle") stages share the rest evenly. Chunk v of every stage precedes chunk v+1 of any."""
    v = vpp or 1

    def bad(field: str, value, why: str):
        return ConfigError(f"config error: parallel.{field}={value}: {why}")

    for field, value in (("num_layers_in_first_pipeline_stage", first),
                         ("num_layers_in_last_pipeline_stage", last)):
        if value is None:
            continue
        if pp < 2:
            raise bad(field, value, "needs parallel.pipeline_model_parallel_size >= 2")
        if value < 1 or value % v:
            raise bad(field, value, f"must be >= 1 and divisible by "
                                    f"parallel.virtual_pipeline_model_parallel_size ({v})")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if first is None and last is None:
        if num_layers % (pp * v):
            raise ConfigError(
                f"config error: model.num_layers={num_layers}: must be divisible by "
                f"pipeline_model_parallel_size * virtual_pipeline_model_parallel_size ({pp * v})")
    elif middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
            middle_stages and middle_layers % (middle_stages * v)):
        raise bad("num_layers_in_first_pipeline_stage", first,
                  f"with num_layers_in_last_pipeline_stage={last} the other {middle_stages} stage(s) "
                  f"must share the remaining {middle_layers} of model.num_layers={num_layers} "
                  f"layers evenly, in multiples of {v} per stage")

    def per_chunk(stage: int) -> int:
        if stage == 0 and first is not None:
            return first // v
        if stage == pp - 1 and last is not None:
            return last // v
        return middle_layers // v // middle_stages

    out, offset = [], 0
    for _ in range(v):
        for stage in range(pp):
            count = per_chunk(stage)
            out.append((stage, offset, count))
            offset += count
    return out
