"""The expert bank's FFN width padded for fp8: stored padded, computed exactly, saved unpadded.

Transformer Engine's fp8 GEMMs need every reduction width to be a multiple of 16
(``config.schema.FP8_GEMM_MULTIPLE``); the paper's 2.3B experts are 744 wide, so fc2's fp8 GEMM
fails ("Leading dimension requirement on A for FP8 GEMM. Caller must pad."; megatron's Fp8Padding
pads token rows only). The bank therefore stores fc1 with ``padded - unpadded`` extra output rows
(in each half, gate and linear, of a gated unit) and fc2 with as many extra input columns, all zero
(``model.moe_ffn_pad_multiple``; by default only under ``train.fp8``).

Why zero padding is exact and stays zero (tests/model/test_expert_padding.py checks each step):

- forward: a zero fc1 row gives a zero pre-activation column; the activation keeps it zero
  (f(0) = 0 for SiLU/GELU/ReLU; a gated unit multiplies by the zero linear half as well); the gate
  probability scales it; fc2's zero column adds nothing. The fp8 cast maps 0 to 0 at any scale and
  never raises an amax.
- backward: fc2's pad-column gradient is grad_out^T @ (zero activation column) = 0; the gradient
  reaching the pad activations is grad_out @ (zero fc2 column) = 0, so fc1's pad rows get 0.
- optimizer: Adam with a zero gradient keeps zero moments and makes a zero update; decoupled weight
  decay of a zero weight is zero; gradient clipping scales zero to zero. So the pads stay exactly 0
  (a non-finite step is skipped by the numerics guard before anything is updated).

Checkpoints never see the pads: ``strip`` replaces each expert's fc1/fc2 entry of the sharded state
dict with a ShardedTensorFactory that saves the unpadded slices under the unpadded model's keys,
offsets and global shapes, and pads with zeros on load. The same factory serves the non-distributed
optimizer's per-parameter state (megatron builds optimizer tensors from the model's factories), so a
checkpoint written by a padded model loads into an unpadded one and back, and HF exports (read from
the checkpoint files) are unchanged. The distributed optimizer's ``dp_reshardable`` state is stored
per grad buffer, pads included: compatibility.py records the stored width and refuses that optimizer
state across a different one (one line).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


class ExpertFFNPadding:
    """How one bank's experts are padded: ``unpadded`` -> ``padded`` FFN width (per expert)."""

    def __init__(self, unpadded: int, padded: int, gated: bool) -> None:
        assert padded > unpadded > 0
        self.unpadded, self.padded, self.gated = unpadded, padded, gated

    # ------------------------------------------------------------------------------------------
    # the weights
    # ------------------------------------------------------------------------------------------
    def fc1_pad_rows(self) -> list[slice]:
        """fc1's pad rows: one range per half (gate | linear) of a gated unit, else one."""
        halves = 2 if self.gated else 1
        return [slice(h * self.padded + self.unpadded, (h + 1) * self.padded) for h in range(halves)]

    def fc1_rows(self) -> list[slice]:
        """fc1's real rows, in the unpadded model's order."""
        halves = 2 if self.gated else 1
        return [slice(h * self.padded, h * self.padded + self.unpadded) for h in range(halves)]

    def zero_(self, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
        with torch.no_grad():
            for rows in self.fc1_pad_rows():
                fc1[rows].zero_()
            fc2[:, self.unpadded:].zero_()

    def pads_are_zero(self, fc1: torch.Tensor, fc2: torch.Tensor) -> bool:
        return (all(not fc1[rows].any() for rows in self.fc1_pad_rows())
                and not fc2[:, self.unpadded:].any())

    def unpadded_weights(self, fc1: torch.Tensor, fc2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (fc1, fc2) as the unpadded model stores them."""
        return (torch.cat([fc1[rows] for rows in self.fc1_rows()]).clone(),
                fc2[:, : self.unpadded].clone())

    def padded_weights(self, fc1: torch.Tensor, fc2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc1, fc2) of the unpadded model, padded with zeros (the inverse of unpadded_weights)."""
        return self._pad_fc1(list(fc1.chunk(2 if self.gated else 1))), self._pad_fc2(fc2)

    def _pad_fc1(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = parts[0].new_zeros(len(parts) * self.padded, parts[0].shape[1])
        for rows, part in zip(self.fc1_rows(), parts):
            out[rows] = part
        return out

    def _pad_fc2(self, fc2: torch.Tensor) -> torch.Tensor:
        out = fc2.new_zeros(fc2.shape[0], self.padded)
        out[:, : self.unpadded] = fc2
        return out

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def strip(self, sharded: dict, offsets: tuple) -> dict:
        """``sharded``: one expert's sharded state dict (dict keys ending in ``linear_fc1.weight`` /
        ``linear_fc2.weight``; ShardedTensors or megatron's SwiGLU factory) whose prepended axes are
        ``offsets`` ((owner layer, expert) and any outer ones). Returns it with both replaced by
        factories that save the unpadded tensors."""
        out = dict(sharded)
        for name, entry in sharded.items():
            if name.endswith("linear_fc1.weight"):
                out[name] = self._factory(entry, offsets, fc1=True)
            elif name.endswith("linear_fc2.weight"):
                out[name] = self._factory(entry, offsets, fc1=False)
        return out

    def _factory(self, entry, offsets: tuple, fc1: bool) -> ShardedTensorFactory:
        prepend = len(offsets)

        def build(key: str, t: torch.Tensor, replica_id, flattened_range: Optional[slice]):
            if flattened_range is not None:  # only the fully_sharded_model_space optimizer format
                raise NotImplementedError("padded expert weights cannot be saved flattened "
                                          "(distributed optimizer format other than dp_reshardable)")
            if fc1:
                parts = [t[rows] for rows in self.fc1_rows()]
                pads = [t[rows] for rows in self.fc1_pad_rows()]
            else:
                parts, pads = [t[:, : self.unpadded].contiguous()], [t[:, self.unpadded:]]
            if any(p.any() for p in pads):  # a nonzero pad would change the model once saved unpadded
                raise RuntimeError(f"{key}: the expert FFN padding ({self.unpadded} -> {self.padded}) "
                                   "is not zero; the padded model no longer equals the saved one")
            n = len(parts)
            return [ShardedTensor.from_rank_offsets(
                        key, part, *offsets, *([(prepend, i, n)] if n > 1 else []),
                        replica_id=replica_id, prepend_axis_num=prepend)
                    for i, part in enumerate(parts)]

        def merge(loaded: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return self._pad_fc1(loaded) if fc1 else self._pad_fc2(loaded[0])

        return ShardedTensorFactory(entry.key, entry.data, build, merge, entry.replica_id)


def bank_config(layer_config, padding: Optional[ExpertFFNPadding]):
    """The config the bank is built with: the layer's, with the padded FFN width (a shallow copy)."""
    if padding is None:
        return layer_config
    config = copy.copy(layer_config)
    config.moe_ffn_hidden_size = padding.padded
    return config


def for_config(cfg, gated: bool) -> Optional[ExpertFFNPadding]:
    """The padding ``cfg`` (an ExperimentConfig) asks for; None when the width is stored as is."""
    m = cfg.model
    padded = m.expert_ffn_stored_size(cfg.train.fp8)
    return ExpertFFNPadding(m.moe_ffn_hidden_size, padded, gated) if padded != m.moe_ffn_hidden_size else None


def slot_weights(bank) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fc1, fc2) weight of every local slot: megatron MLPs (ExpertBank) or TE GroupedLinear (TEExpertBank)."""
    if hasattr(bank, "local_experts"):
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in bank.local_experts]
    return [(getattr(bank.linear_fc1, f"weight{i}"), getattr(bank.linear_fc2, f"weight{i}"))
            for i in range(bank.num_local_experts)]


def attach(bank, padding: Optional[ExpertFFNPadding]) -> None:
    """Give a freshly built bank its padding: zero the pads, and let sharded_state_dict strip them."""
    bank.ffn_padding = padding
    if padding is None:
        return
    activation = bank.config.activation_func
    if activation(torch.zeros(1)).item() != 0:
        raise ValueError(f"expert FFN padding needs an activation with f(0) = 0 ({activation!r} is not); "
                         "set model.moe_ffn_pad_multiple=1 and a width that is a multiple of 16")
    for fc1, fc2 in slot_weights(bank):
        padding.zero_(fc1, fc2)


def padding_elements(bank) -> int:
    """How many of the bank's parameter elements are padding (0 when it is not padded)."""
    padding = getattr(bank, "ffn_padding", None)
    if padding is None:
        return 0
    extra = padding.padded - padding.unpadded
    return sum(extra * (fc1.shape[1] * (2 if padding.gated else 1) + fc2.shape[0]) for fc1, fc2 in slot_weights(bank))


def pads_are_zero(bank) -> bool:
    padding = getattr(bank, "ffn_padding", None)
    return padding is None or all(padding.pads_are_zero(fc1, fc2) for fc1, fc2 in slot_weights(bank))
