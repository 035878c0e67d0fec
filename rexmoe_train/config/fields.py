"""The config's vocabulary: the allowed values of every choice field (string enums Hydra
validates), bounds, and the one-line value checks each section's ``validate()`` uses."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from rexmoe_train.core.errors import ConfigError
from rexmoe_train.core.psr import MASK_DRAWS as PSR_MASK_DRAWS
from rexmoe_train.core.psr import SCHEDULES as PSR_SCHEDULE_KINDS

INT64_MAX = 2**63 - 1


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config error: {path}={value!r}: {allowed}")


def _one_of(path: str, value: Any, options: tuple) -> None:
    if value not in options:
        _fail(path, value, "must be one of " + ", ".join(map(str, options)))


def _finite(path: str, value: Any) -> None:
    """inf and nan pass every ``<`` / ``<=`` comparison the wrong way: reject them first, so that the
    field named is the one that is wrong (train.lr=nan used to be blamed on min_lr)."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(path, value, "must be a finite number")


def _at_least(path: str, value: Any, low: float) -> None:
    _finite(path, value)
    if value < low:
        _fail(path, value, f"must be >= {low}")


def _positive(path: str, value: Any) -> None:
    _finite(path, value)
    if not value > 0:
        _fail(path, value, "must be > 0")


class Choice(str, Enum):
    """A closed set of string values for a config field; ``values()`` is the one list validation,
    errors and docs use. Fields stay typed ``str`` (what YAML and the command line give)."""

    @classmethod
    def values(cls) -> tuple:
        return tuple(member.value for member in cls)


def _choice(name: str, *values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])


Gating = _choice("Gating", "softmax_then_topk", "topk_then_softmax", "sigmoid")
PSRScheduleKind = _choice("PSRScheduleKind", *PSR_SCHEDULE_KINDS)  # core/psr.py owns the list
PSRMaskOn = _choice("PSRMaskOn", "scores", "logits")
PSRMaskDraw = _choice("PSRMaskDraw", *PSR_MASK_DRAWS)  # core/psr.py owns the list
BalanceScope = _choice("BalanceScope", "micro_batch", "global_batch")
ExpertBiasScope = _choice("ExpertBiasScope", "router", "physical")
GateNormalization = _choice("GateNormalization", "none", "renorm_topk", "scale_candidates")
Dispatcher = _choice("Dispatcher", "alltoall", "allgather", "rexmoe_dedup")  # rexmoe_dedup: parallel/dispatcher.py
Normalization = _choice("Normalization", "RMSNorm", "LayerNorm")
LRDecayStyle = _choice("LRDecayStyle", "cosine", "linear", "constant")
WandbMode = _choice("WandbMode", "disabled", "offline", "online")
TransformerImpl = _choice("TransformerImpl", "local", "transformer_engine", "auto")  # auto: TE on a GPU with TE
KernelImpl = _choice("KernelImpl", "auto", "torch", "triton")
DropPolicy = _choice("DropPolicy", "probs", "position")  # megatron's moe_token_drop_policy values
FP8Format = _choice("FP8Format", "hybrid", "e4m3")
FP8Recipe = _choice("FP8Recipe", "delayed", "tensorwise", "blockwise")

GATINGS = Gating.values()
PSR_SCHEDULES = PSRScheduleKind.values()
PSR_MASK_ON = PSRMaskOn.values()
PSR_MASK_DRAW = PSRMaskDraw.values()
BALANCE_SCOPES = BalanceScope.values()
EXPERT_BIAS_SCOPES = ExpertBiasScope.values()
GATE_NORMALIZATIONS = GateNormalization.values()
DISPATCHERS = Dispatcher.values()
NORMALIZATIONS = Normalization.values()
LR_DECAY_STYLES = LRDecayStyle.values()
WANDB_MODES = WandbMode.values()
TRANSFORMER_IMPLS = TransformerImpl.values()
KERNEL_IMPLS = KernelImpl.values()
DROP_POLICIES = DropPolicy.values()
FP8_FORMATS = (None, *FP8Format.values())
FP8_RECIPES = FP8Recipe.values()
# activation recompute: megatron's TransformerConfig values (see ModelConfig)
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
# Transformer Engine's fp8 GEMMs (cuBLASLt, TN layout on Hopper) need every reduction dimension, i.e.
# every weight's input width, to be a multiple of 16 elements, for all three recipes ("Leading
# dimension requirement on A for FP8 GEMM. Caller must pad.", common/gemm/cublaslt_gemm.cu); token
# rows are padded by megatron's Fp8Padding (16 for these recipes, TE 2.11 get_align_size_for_quantization).
FP8_GEMM_MULTIPLE = 16
