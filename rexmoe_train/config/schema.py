"""Typed configuration: the composed Hydra config is turned into these dataclasses and validated
before anything is built, so a bad value fails in one line instead of deep inside megatron.

Field names follow Megatron-LM where one exists (``num_layers``, ``moe_router_topk``,
``expert_model_parallel_size``...). The ``rexmoe`` block holds what the method adds.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from rexmoe_train.core.errors import ConfigError
from rexmoe_train.core.psr import MASK_DRAWS as PSR_MASK_DRAWS
from rexmoe_train.core.psr import SCHEDULES as PSR_SCHEDULE_KINDS
from rexmoe_train.core.reuse import ReusePlan


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


@dataclass
class PSRConfig:
    """Progressive scaling routing: candidates grow from N (t <= start_step) to r*N (t >= end_step)."""

    schedule: str = "linear"  # linear | stepwise | cosine | none (all r*N candidates from step 1)
    start_step: int = 0
    end_step: int = 1
    mask_on: str = "scores"  # scores: zero post-softmax scores (paper); logits: -inf before softmax
    protect_local: bool = False  # keep a layer's own N experts always available
    # per_step: a fresh random mask every optimizer step (the paper); nested: one random order of the
    # candidates per layer for the whole run, the first N_t of it available, so a candidate once
    # opened stays open (docs/ablation_tiny.md section 5: the per-step redraw is what costs)
    mask_draw: str = "per_step"
    seed: Optional[int] = None  # mask seed; defaults to train.seed

    def validate(self, path: str = "rexmoe.psr") -> None:
        _one_of(f"{path}.schedule", self.schedule, PSR_SCHEDULES)
        _one_of(f"{path}.mask_on", self.mask_on, PSR_MASK_ON)
        _one_of(f"{path}.mask_draw", self.mask_draw, PSR_MASK_DRAW)
        _at_least(f"{path}.start_step", self.start_step, 0)
        _at_least(f"{path}.end_step", self.end_step, 0)
        if self.seed is not None:
            _at_least(f"{path}.seed", self.seed, 0)
        if self.schedule != "none" and self.end_step <= self.start_step:
            _fail(f"{path}.end_step", self.end_step, f"must be > {path}.start_step ({self.start_step})")


@dataclass
class BalanceConfig:
    """Load balancing. Coefficient 0 disables a term."""

    layer_aux_coeff: float = 1e-2  # per-layer switch loss over the layer's r*N candidates
    layer_aux_scope: str = "micro_batch"  # micro_batch | global_batch (counts over the step and DP)
    group_aux_coeff: float = 0.0  # group-pooled switch loss over each physical expert's load
    group_aux_scope: str = "micro_batch"
    z_loss_coeff: float = 1e-3  # router z-loss (0 disables)
    # Aux-loss-free balancing (DeepSeek-V3; megatron's names): a per-candidate bias added to the
    # routing scores for the top-k choice only, moved by +-rate after every optimizer step towards
    # the global-batch mean load (model/balance.py update_expert_bias). Scope router: each router's
    # own r*N biases from its own load; physical: one bias per physical expert, shared by the r
    # routers of its group and driven by the load it gets from all of them.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    expert_bias_scope: str = "router"

    def validate(self, path: str = "rexmoe.balance") -> None:
        for name in ("layer_aux_coeff", "group_aux_coeff", "z_loss_coeff"):
            _at_least(f"{path}.{name}", getattr(self, name), 0.0)
        _one_of(f"{path}.layer_aux_scope", self.layer_aux_scope, BALANCE_SCOPES)
        _one_of(f"{path}.group_aux_scope", self.group_aux_scope, BALANCE_SCOPES)
        _one_of(f"{path}.moe_router_enable_expert_bias", self.moe_router_enable_expert_bias, (True, False))
        _positive(f"{path}.moe_router_bias_update_rate", self.moe_router_bias_update_rate)
        _one_of(f"{path}.expert_bias_scope", self.expert_bias_scope, EXPERT_BIAS_SCOPES)


@dataclass
class ReXMoEConfig:
    reuse_group_size: int = 1  # r; 1 is vanilla MoE
    allow_partial_last_group: bool = False
    gating: str = "softmax_then_topk"
    # What the kept (top-k) gate values are scaled by. none: as the gating gives them (the paper).
    # renorm_topk: divided by their sum, so each token's gates sum to 1 (what topk_then_softmax and
    # sigmoid with k > 1 already do). scale_candidates: multiplied by N_t / N (candidates available
    # now over a layer's own N): a softmax over r*N candidates makes every kept gate about r times
    # smaller than vanilla's softmax over N; this restores the vanilla scale and keeps the ratios.
    gate_normalization: str = "none"
    psr: PSRConfig = field(default_factory=PSRConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    # Triton kernels (kernels/): the fused router (softmax_then_topk gating with the PSR
    # mask on scores) and the rexmoe_dedup dispatcher's permute/unpermute. auto: Triton on a GPU when
    # triton is importable, torch elsewhere; triton forces them (on CPU only under TRITON_INTERPRET=1).
    kernels: str = "auto"

    def validate(self, path: str = "rexmoe") -> None:
        _at_least(f"{path}.reuse_group_size", self.reuse_group_size, 1)
        _one_of(f"{path}.gating", self.gating, GATINGS)
        _one_of(f"{path}.gate_normalization", self.gate_normalization, GATE_NORMALIZATIONS)
        _one_of(f"{path}.kernels", self.kernels, KERNEL_IMPLS)
        if self.kernels == "triton":
            if self.gating != "softmax_then_topk" or self.psr.mask_on != "scores":
                _fail(f"{path}.kernels", self.kernels,
                      f"the fused router implements {path}.gating=softmax_then_topk with "
                      f"{path}.psr.mask_on=scores only; use auto (torch gating for other settings)")
            if self.balance.moe_router_enable_expert_bias:
                _fail(f"{path}.kernels", self.kernels,
                      f"the fused router has no selection bias ({path}.balance.moe_router_enable_expert_bias"
                      "=true); use auto (torch gating for other settings)")
        self.psr.validate(f"{path}.psr")
        self.balance.validate(f"{path}.balance")


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = MHA
    ffn_hidden_size: Optional[int] = None  # dense layers (first_k_dense_layers); default 4*hidden
    num_moe_experts: int = 8  # N: experts owned by each MoE layer
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 256
    moe_shared_expert_intermediate_size: Optional[int] = None  # total size of the shared experts
    first_k_dense_layers: int = 0
    normalization: str = "RMSNorm"
    rotary_base: int = 10000
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    vocab_size: Optional[int] = None  # None: from the tokenizer
    make_vocab_size_divisible_by: int = 64
    max_position_embeddings: Optional[int] = None  # None: train.seq_length
    transformer_impl: str = "auto"  # local (megatron torch modules) | transformer_engine | auto
    qk_layernorm: bool = False  # per-head norm (model.normalization) of queries and keys (Qwen3-MoE)
    kv_channels: Optional[int] = None  # head size; None: hidden_size / num_attention_heads
    norm_epsilon: float = 1e-5  # epsilon of every norm (megatron's default; Qwen checkpoints use 1e-6)
    # Token dropping (default: dropless). With a factor C each ROUTER sends each of its available
    # candidates at most ceil(C * tokens * k / N_t) of the micro-batch's local tokens (N_t: PSR's
    # available count); the surplus is dropped by moe_token_drop_policy: probs keeps the highest gate
    # values, position the earliest tokens (megatron's policies). A physical expert reused by r
    # routers can thus receive up to r such quotas. r=1 is megatron's own capacity rule.
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"  # probs | position
    # Expert bank on the local path: true runs all of a reuse group's local slots as one grouped GEMM
    # per projection (torch grouped_mm; the SequentialMLP loop where grouped_mm does not run), false
    # megatron's SequentialMLP loop, auto: grouped on a GPU, the loop on CPU (where it measured no
    # faster; model/experts.py, bank_class). The transformer_engine path is always grouped.
    moe_grouped_gemm: Any = "auto"  # auto | true | false (Megatron's name)
    # The expert bank stores fc1/fc2 with the FFN width padded to a multiple of this (zero rows of fc1,
    # zero columns of fc2: they change no output and get zero gradients; checkpoints and exports hold
    # the unpadded moe_ffn_hidden_size; model/expert_padding.py). null: FP8_GEMM_MULTIPLE (16) under
    # train.fp8, no padding otherwise (e.g. the 2.3B's 744 -> 752 in fp8); 1: never pad.
    moe_ffn_pad_multiple: Optional[int] = None
    # Activation recompute, megatron's fields and semantics: full recomputes whole layers
    # (recompute_method uniform: chunks of recompute_num_layers layers; block: the first
    # recompute_num_layers layers of each pipeline stage); selective recomputes recompute_modules
    # (core_attn, moe_act, layernorm, mlp, moe, shared_experts; null: megatron's default [core_attn]).
    # Router counters (metrics, balance counts, dispatch bytes) count each micro-batch once however
    # often its forward is replayed (model/router.py).
    recompute_granularity: Optional[str] = None  # null | full | selective
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only
    recompute_modules: Optional[list] = None  # selective only

    def _validate_recompute(self, path: str) -> None:
        _one_of(f"{path}.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        full = self.recompute_granularity == "full"
        if full:
            _one_of(f"{path}.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
            if self.recompute_num_layers is None or not 1 <= self.recompute_num_layers <= self.num_layers:
                _fail(f"{path}.recompute_num_layers", self.recompute_num_layers,
                      f"must be in [1, {path}.num_layers] = [1, {self.num_layers}] with "
                      f"{path}.recompute_granularity=full")
        else:
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    _fail(f"{path}.{name}", getattr(self, name),
                          f"must be null unless {path}.recompute_granularity=full")
        if self.recompute_modules is not None:
            if self.recompute_granularity != "selective":
                _fail(f"{path}.recompute_modules", self.recompute_modules,
                      f"must be null unless {path}.recompute_granularity=selective")
            if not isinstance(self.recompute_modules, (list, tuple)) or any(
                    m not in RECOMPUTE_MODULES for m in self.recompute_modules):
                _fail(f"{path}.recompute_modules", self.recompute_modules,
                      "must be a list of " + ", ".join(RECOMPUTE_MODULES))
            if "layernorm" in self.recompute_modules and self.resolved_transformer_impl() != "transformer_engine":
                # megatron 0.16's TransformerLayer builds CheckpointWithoutOutput() whose fp8 path
                # needs Transformer Engine even without fp8
                _fail(f"{path}.recompute_modules", self.recompute_modules,
                      "layernorm needs Transformer Engine in megatron-core 0.16 (not available here); "
                      "drop it or use the others")
            if "moe_act" in self.recompute_modules and not self.resolved_moe_grouped_gemm():
                _fail(f"{path}.recompute_modules", self.recompute_modules,
                      f"moe_act needs a grouped expert bank; set {path}.moe_grouped_gemm=true "
                      f"(auto is the SequentialMLP loop on CPU)")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def resolved_moe_grouped_gemm(self) -> bool:
        """Whether the expert bank is grouped: true/false as given; auto is grouped on a GPU (CUDA's
        grouped GEMM kernel) and on the transformer_engine path, the SequentialMLP loop on CPU."""
        if self.moe_grouped_gemm != "auto":
            return bool(self.moe_grouped_gemm)
        from rexmoe_train import platform  # local: keeps config import light

        return platform.HAS_CUDA or self.resolved_transformer_impl() == "transformer_engine"

    def expert_ffn_stored_size(self, fp8: Optional[str]) -> int:
        """The FFN width the expert bank stores: moe_ffn_hidden_size rounded up to
        ``moe_ffn_pad_multiple`` (null: FP8_GEMM_MULTIPLE when ``fp8`` is set, else no padding)."""
        multiple = self.moe_ffn_pad_multiple
        if multiple is None:
            multiple = FP8_GEMM_MULTIPLE if fp8 is not None else 1
        return -(-self.moe_ffn_hidden_size // multiple) * multiple

    def resolved_transformer_impl(self) -> str:
        """"local" or "transformer_engine": auto is TE exactly when the platform has TE on a GPU."""
        if self.transformer_impl != "auto":
            return self.transformer_impl
        from rexmoe_train import platform  # local: keeps config import light

        return "transformer_engine" if platform.has_transformer_engine() else "local"

    def validate(self, path: str = "model") -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_moe_experts",
                     "moe_router_topk", "moe_ffn_hidden_size"):
            _at_least(f"{path}.{name}", getattr(self, name), 1)
        if self.kv_channels is not None:
            _at_least(f"{path}.kv_channels", self.kv_channels, 1)
        elif self.hidden_size % self.num_attention_heads:
            _fail(f"{path}.hidden_size", self.hidden_size,
                  f"must be divisible by {path}.num_attention_heads ({self.num_attention_heads})")
        if self.num_query_groups is not None and (
            self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups
        ):
            _fail(f"{path}.num_query_groups", self.num_query_groups,
                  f"must be >= 1 and divide {path}.num_attention_heads ({self.num_attention_heads})")
        if self.moe_router_topk > self.num_moe_experts:
            # PSR starts every router with its own N candidates, so k <= N is what must hold.
            _fail(f"{path}.moe_router_topk", self.moe_router_topk,
                  f"must be <= the candidates available at step 0, {path}.num_moe_experts "
                  f"({self.num_moe_experts})")
        if not 0 <= self.first_k_dense_layers < self.num_layers:
            _fail(f"{path}.first_k_dense_layers", self.first_k_dense_layers,
                  f"must be in [0, {path}.num_layers) = [0, {self.num_layers})")
        if self.moe_shared_expert_intermediate_size is not None:
            _at_least(f"{path}.moe_shared_expert_intermediate_size",
                      self.moe_shared_expert_intermediate_size, 1)
        _one_of(f"{path}.normalization", self.normalization, NORMALIZATIONS)
        _one_of(f"{path}.qk_layernorm", self.qk_layernorm, (True, False))
        if self.moe_expert_capacity_factor is not None and not (
                math.isfinite(self.moe_expert_capacity_factor) and self.moe_expert_capacity_factor > 0):
            _fail(f"{path}.moe_expert_capacity_factor", self.moe_expert_capacity_factor,
                  "must be a finite number > 0 (null: dropless)")
        # rotary_base 0 or 1 makes every RoPE frequency 0^x / 1: NaN or no position signal at all
        _at_least(f"{path}.rotary_base", self.rotary_base, 2)
        _positive(f"{path}.init_method_std", self.init_method_std)
        if self.vocab_size is not None:
            _at_least(f"{path}.vocab_size", self.vocab_size, 1)
        if self.max_position_embeddings is not None:
            _at_least(f"{path}.max_position_embeddings", self.max_position_embeddings, 1)
        _one_of(f"{path}.moe_token_drop_policy", self.moe_token_drop_policy, DROP_POLICIES)
        if not (self.moe_grouped_gemm is True or self.moe_grouped_gemm is False
                or self.moe_grouped_gemm == "auto"):
            _fail(f"{path}.moe_grouped_gemm", self.moe_grouped_gemm, "must be one of auto, true, false")
        if self.moe_ffn_pad_multiple is not None:
            _at_least(f"{path}.moe_ffn_pad_multiple", self.moe_ffn_pad_multiple, 1)
        self._validate_recompute(path)
        if not 0 < self.norm_epsilon < 1:
            _fail(f"{path}.norm_epsilon", self.norm_epsilon, "must be in (0, 1)")
        _at_least(f"{path}.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by, 1)
        _one_of(f"{path}.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # uneven pipeline (megatron's options): layers on the first / last stage, the other stages share
    # the rest evenly; every stage boundary must still fall on a reuse-group boundary
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1 (megatron requires it with MoE)
    use_distributed_optimizer: bool = False
    moe_token_dispatcher_type: str = "alltoall"

    def validate(self, path: str = "parallel") -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size"):
            _at_least(f"{path}.{name}", getattr(self, name), 1)
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            if getattr(self, name) is not None:
                _at_least(f"{path}.{name}", getattr(self, name), 1)
        if self.virtual_pipeline_model_parallel_size is not None:
            _at_least(f"{path}.virtual_pipeline_model_parallel_size",
                      self.virtual_pipeline_model_parallel_size, 2)
            if self.pipeline_model_parallel_size < 2:
                _fail(f"{path}.virtual_pipeline_model_parallel_size",
                      self.virtual_pipeline_model_parallel_size,
                      f"needs {path}.pipeline_model_parallel_size >= 2")
        _one_of(f"{path}.moe_token_dispatcher_type", self.moe_token_dispatcher_type, DISPATCHERS)
        if self.sequence_parallel is False and self.tensor_model_parallel_size > 1:
            _fail(f"{path}.sequence_parallel", False,
                  "must be true (or null) when tensor_model_parallel_size > 1: megatron MoE needs it")


@dataclass
class TrainConfig:
    seed: int = 42
    train_iters: int = 250
    global_batch_size: int = 8
    micro_batch_size: int = 4
    seq_length: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: Optional[int] = None  # None: min(20, train_iters // 10), resolved_lr_warmup_iters()
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: Optional[bool] = None  # None: the platform default (bf16 on GPU, fp32 on CPU)
    fp8: Optional[str] = None  # None | hybrid | e4m3: TE fp8 GEMMs (GPU + transformer_engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise (megatron's Fp8Recipe names)
    fp8_amax_history_len: int = 1024  # delayed scaling: amax window (megatron's default is 1)
    log_interval: int = 1
    eval_interval: int = 50
    eval_iters: int = 4  # validation micro-batches per evaluation (per data-parallel rank)

    def resolved_lr_warmup_iters(self, default: bool = False) -> int:
        """``lr_warmup_iters``, or (when None, or asked for the ``default``) a tenth of the run capped
        at 20 steps. WHY derived: a fixed 20 rejected every smoke run of <= 20 steps; from 200 steps
        on the default is the 20 it always was."""
        if self.lr_warmup_iters is not None and not default:
            return self.lr_warmup_iters
        return min(20, self.train_iters // 10)

    def validate(self, path: str = "train") -> None:
        for name in ("train_iters", "global_batch_size", "micro_batch_size", "seq_length",
                     "log_interval", "eval_interval", "eval_iters"):
            _at_least(f"{path}.{name}", getattr(self, name), 1)
        _at_least(f"{path}.seed", self.seed, 0)
        _positive(f"{path}.lr", self.lr)
        _finite(f"{path}.min_lr", self.min_lr)
        if not 0 <= self.min_lr <= self.lr:
            _fail(f"{path}.min_lr", self.min_lr, f"must be in [0, {path}.lr] = [0, {self.lr}]")
        if self.lr_warmup_iters is not None and not 0 <= self.lr_warmup_iters < self.train_iters:
            _fail(f"{path}.lr_warmup_iters", self.lr_warmup_iters,
                  f"must be in [0, {path}.train_iters) = [0, {self.train_iters}): pass "
                  f"{path}.lr_warmup_iters={max(0, self.train_iters - 1)} or less, or null for the default "
                  f"min(20, {path}.train_iters // 10) = {self.resolved_lr_warmup_iters(default=True)}")
        _one_of(f"{path}.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        warmup = self.resolved_lr_warmup_iters()
        if self.lr_decay_iters is not None and self.lr_decay_iters <= warmup:
            _fail(f"{path}.lr_decay_iters", self.lr_decay_iters,
                  f"must be > the warm-up, {path}.lr_warmup_iters ({warmup})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"{path}.{name}", getattr(self, name), "must be in [0, 1)")
        _positive(f"{path}.adam_eps", self.adam_eps)
        _at_least(f"{path}.clip_grad", self.clip_grad, 0.0)
        _one_of(f"{path}.fp8", self.fp8, FP8_FORMATS)
        _one_of(f"{path}.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _at_least(f"{path}.fp8_amax_history_len", self.fp8_amax_history_len, 1)
        _at_least(f"{path}.weight_decay", self.weight_decay, 0.0)
        if self.global_batch_size % self.micro_batch_size:
            _fail(f"{path}.global_batch_size", self.global_batch_size,
                  f"must be a multiple of {path}.micro_batch_size ({self.micro_batch_size})")


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded: the Python standard library's sources, byte tokenizer;
    #                           indexed: megatron .bin/.idx datasets made by rexmoe-preprocess
    valid_fraction: float = 0.02  # embedded only
    max_bytes: Optional[int] = None  # cap on the embedded corpus (whole documents)
    # indexed only (rexmoe_train/data/indexed.py):
    blend: Optional[list] = None  # [w1, prefix1, w2, prefix2, ...], or [prefix, ...] (weights by size)
    split: str = "98,2,0"  # train,valid,test shares of each dataset's documents
    tokenizer: str = "byte"  # byte | the tokenizer.json or Hugging Face tokenizer folder the data was preprocessed with
    cache_dir: Optional[str] = None  # megatron's sample-index cache; None: <run.dir>/data_cache

    def blend_spec(self, path: str = "data") -> tuple[list[str], Optional[list[float]]]:
        """``data.blend`` as megatron's (prefixes, weights or None)."""
        blend = [self.blend] if isinstance(self.blend, str) else self.blend
        allowed = "must be a non-empty list [weight1, prefix1, weight2, prefix2, ...] or [prefix, ...]"
        if not isinstance(blend, (list, tuple)) or not blend:
            _fail(f"{path}.blend", self.blend, allowed)
        if all(isinstance(item, str) for item in blend):
            prefixes, weights = list(blend), None
        else:
            if len(blend) % 2:
                _fail(f"{path}.blend", self.blend, allowed + " (odd length)")
            weights, prefixes = list(blend[0::2]), list(blend[1::2])
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
                _fail(f"{path}.blend", self.blend, allowed + ": weights must be numbers > 0")
            weights = [float(w) for w in weights]
        if not all(isinstance(p, str) and p.strip() for p in prefixes):
            _fail(f"{path}.blend", self.blend, allowed + ": prefixes must be non-empty paths")
        return prefixes, weights

    def split_shares(self, path: str = "data") -> list[float]:
        """``data.split`` as [train, valid, test] shares (unnormalised)."""
        parts = [p.strip() for p in str(self.split).split(",")]
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if not 1 <= len(shares) <= 3 or any(not 0 <= s < float("inf") for s in shares):
            _fail(f"{path}.split", self.split, 'must be up to 3 comma-separated shares >= 0, e.g. "98,2,0"')
        shares += [0.0] * (3 - len(shares))
        if shares[0] <= 0 or shares[1] <= 0:
            _fail(f"{path}.split", self.split,
                  "the train and valid shares must be > 0 (validation runs from step 0)")
        return shares

    def validate(self, path: str = "data") -> None:
        _one_of(f"{path}.source", self.source, ("embedded", "indexed"))
        if not 0 < self.valid_fraction < 1:
            _fail(f"{path}.valid_fraction", self.valid_fraction, "must be in (0, 1)")
        if self.max_bytes is not None:
            _at_least(f"{path}.max_bytes", self.max_bytes, 1)
        if not self.tokenizer or not self.tokenizer.strip():
            _fail(f"{path}.tokenizer", self.tokenizer,
                  "must be byte or a path to a tokenizer.json or a Hugging Face tokenizer folder")
        if self.cache_dir is not None and not self.cache_dir.strip():
            _fail(f"{path}.cache_dir", self.cache_dir, "must be null or a non-empty path")
        if self.source == "embedded":
            if self.blend is not None:
                _fail(f"{path}.blend", self.blend, f"is read only with {path}.source=indexed")
            if self.tokenizer != "byte":
                _fail(f"{path}.tokenizer", self.tokenizer,
                      f"must be byte with {path}.source=embedded (the embedded corpus is byte-tokenized)")
        else:
            if self.blend is None:
                _fail(f"{path}.blend", None, f"must list the dataset prefixes with {path}.source=indexed "
                                             "(make them with rexmoe-preprocess)")
            self.blend_spec(path)
            self.split_shares(path)


@dataclass
class WandbConfig:
    mode: str = "offline"  # online only when asked: no account, key or network needed by default
    project: str = "rexmoe"
    name: Optional[str] = None

    def validate(self, path: str = "run.wandb") -> None:
        _one_of(f"{path}.mode", self.mode, WANDB_MODES)


@dataclass
class RunConfig:
    dir: Optional[str] = "runs/default"  # rexmoe-train: null derives runs/<model>-r<r>[-<hash>]
    progress: bool = True
    dry_run: bool = False  # validate, print layout / placement / parameter and memory estimates, exit
    # collapse alarm: warn when one expert takes more than this share of a reuse group's assignments
    # on this many consecutive logged steps (spec §4: large r collapses onto a few experts)
    collapse_share: float = 0.5
    collapse_intervals: int = 3
    # intra-op (OpenMP) threads per process; None: the cores this process may use / the processes on
    # this node (rexmoe_train/threads.py). OMP_NUM_THREADS set in the environment wins over both.
    num_threads: Optional[int] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, path: str = "run") -> None:
        if not self.dir:
            _fail(f"{path}.dir", self.dir, "must be a non-empty path")
        if not 0 < self.collapse_share <= 1:
            _fail(f"{path}.collapse_share", self.collapse_share, "must be in (0, 1]")
        _at_least(f"{path}.collapse_intervals", self.collapse_intervals, 1)
        if self.num_threads is not None:
            _at_least(f"{path}.num_threads", self.num_threads, 1)
        self.wandb.validate(f"{path}.wandb")


@dataclass
class CheckpointConfig:
    """Checkpoints (megatron dist_checkpointing, torch_dist), resume, pre-emption, numerics guard.

    See docs/reliability.md. Exit status 75 means "pre-empted or out of time, checkpoint saved"."""

    save: Optional[str] = None  # None: <run.dir>/checkpoints
    load: Optional[str] = None  # None: resume from `save` if it holds latest_checkpointed_iteration.txt
    save_interval: int = 0  # steps between saves; 0: only at the end and on pre-emption
    keep_last_n: Optional[int] = 3  # iter_* dirs kept after a save; None keeps all
    load_optimizer: bool = True  # false: load model, LR schedule and step only (any layout)
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1: save at the next step boundary, exit 75
    exit_duration_mins: Optional[float] = None  # wall-clock budget: save and exit 75 when spent
    max_skipped_steps: int = 10  # non-finite loss/grad-norm steps skipped before halting
    # Interval saves are written by a background process (megatron's async save) while training goes
    # on; the pointer moves only once every rank's files are written and verified. The final and the
    # pre-emption saves are always waited for. On by default: the guarantees are those of a blocking
    # save, and the cost is one host copy of this rank's state while it is written (docs/reliability.md).
    async_save: bool = True

    def validate(self, path: str = "checkpoint") -> None:
        for name in ("save", "load"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                _fail(f"{path}.{name}", value, "must be null or a non-empty path")
        _at_least(f"{path}.save_interval", self.save_interval, 0)
        if self.keep_last_n is not None:
            _at_least(f"{path}.keep_last_n", self.keep_last_n, 1)
        if self.exit_duration_mins is not None and not (
                math.isfinite(self.exit_duration_mins) and self.exit_duration_mins > 0):
            _fail(f"{path}.exit_duration_mins", self.exit_duration_mins, "must be null or a finite number > 0")
        _at_least(f"{path}.max_skipped_steps", self.max_skipped_steps, 0)


@dataclass
class ResilienceConfig:
    """Collective timeouts, the hang watchdog and the straggler report (resilience/watchdog.py,
    resilience/straggler.py; docs/reliability.md). Times in seconds; a budget of null turns its check off."""

    # collective timeout while starting (process groups, data, checkpoint load, the first step),
    # then the tighter one once training runs: a collective blocked this long raises on every rank
    init_timeout_s: float = 900.0
    train_timeout_s: float = 600.0
    # watchdog budgets: a section that overruns dumps every live rank's stacks and flight-recorder
    # trace under <run.dir>/hang/ and exits 76 (the launcher restarts). Below train_timeout_s, so the
    # evidence is written before a collective times out. The first step of a process gets init_timeout_s.
    step_timeout_s: Optional[float] = 300.0
    eval_timeout_s: Optional[float] = 300.0
    save_timeout_s: Optional[float] = 1800.0
    # straggler report: every train.log_interval the per-rank busy time per step (step time less the
    # time spent waiting in collectives) is gathered; a rank slower than the median by more than
    # straggler_threshold (a fraction) and straggler_min_excess_s, for straggler_intervals logged
    # intervals in a row, is named in the log and in metrics.jsonl ("straggler")
    straggler_report: bool = True
    straggler_threshold: float = 0.25
    straggler_min_excess_s: float = 0.05
    straggler_intervals: int = 5

    def validate(self, path: str = "resilience") -> None:
        for name in ("init_timeout_s", "train_timeout_s"):
            _positive(f"{path}.{name}", getattr(self, name))
        for name in ("step_timeout_s", "eval_timeout_s", "save_timeout_s"):
            if getattr(self, name) is not None:
                _positive(f"{path}.{name}", getattr(self, name))
        _positive(f"{path}.straggler_threshold", self.straggler_threshold)
        _at_least(f"{path}.straggler_min_excess_s", self.straggler_min_excess_s, 0.0)
        _at_least(f"{path}.straggler_intervals", self.straggler_intervals, 1)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rexmoe: ReXMoEConfig = field(default_factory=ReXMoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def validate(self, world_size: Optional[int] = None) -> ExperimentConfig:
        """Check every field and the cross-field rules. ``world_size`` adds the layout checks."""
        self.model.validate()
        self.rexmoe.validate()
        self.parallel.validate()
        self.train.validate()
        self.data.validate()
        self.run.validate()
        self.checkpoint.validate()
        self.resilience.validate()
        m, r, p = self.model, self.rexmoe, self.parallel
        if m.num_moe_layers % r.reuse_group_size and not r.allow_partial_last_group:
            _fail("rexmoe.reuse_group_size", r.reuse_group_size,
                  f"must divide the MoE layer count ({m.num_moe_layers} = model.num_layers - "
                  f"model.first_k_dense_layers), or set rexmoe.allow_partial_last_group=true")
        if r.reuse_group_size > m.num_moe_layers:
            _fail("rexmoe.reuse_group_size", r.reuse_group_size,
                  f"must be <= the MoE layer count ({m.num_moe_layers})")
        if m.num_moe_experts % p.expert_model_parallel_size:
            _fail("parallel.expert_model_parallel_size", p.expert_model_parallel_size,
                  f"must divide model.num_moe_experts ({m.num_moe_experts})")
        heads_kv = m.num_query_groups or m.num_attention_heads
        if heads_kv % p.tensor_model_parallel_size:
            _fail("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size,
                  f"must divide the attention query groups ({heads_kv})")
        if self.train.seq_length % p.tensor_model_parallel_size:
            _fail("train.seq_length", self.train.seq_length,
                  "must be divisible by parallel.tensor_model_parallel_size (sequence parallelism)")
        if self.train.fp8 is not None and m.transformer_impl == "local":
            _fail("train.fp8", self.train.fp8,
                  "needs Transformer Engine (model.transformer_impl=local never uses it); use "
                  "model.transformer_impl=auto or transformer_engine, or train.fp8=null")
        stored = m.expert_ffn_stored_size(self.train.fp8)
        if stored != m.moe_ffn_hidden_size and p.expert_tensor_parallel_size > 1:
            _fail("parallel.expert_tensor_parallel_size", p.expert_tensor_parallel_size,
                  f"must be 1 while the expert bank pads model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} "
                  f"to {stored} (model.moe_ffn_pad_multiple, train.fp8)")
        if self.train.fp8 is not None:
            self._validate_fp8_shapes()
        self.reuse_plan().check_pipeline_split(
            p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
            p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage,
        )
        if world_size is not None:
            self.validate_layout(world_size)
        return self

    def _validate_fp8_shapes(self) -> None:
        """What TE's fp8 GEMMs cannot run (FP8_GEMM_MULTIPLE), refused here in one line instead of a
        cuBLASLt error mid-run. The expert FFN is padded by the bank unless moe_ffn_pad_multiple forbids it."""
        m, p, t, k = self.model, self.parallel, self.train, FP8_GEMM_MULTIPLE
        why = f"must be a multiple of {k} with train.fp8={t.fp8!r} (Transformer Engine's fp8 GEMM)"
        if m.expert_ffn_stored_size(t.fp8) % k:
            _fail("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size,
                  f"{why}; the expert bank pads it to model.moe_ffn_pad_multiple="
                  f"{m.moe_ffn_pad_multiple}: set that to null (pads to {k}) or a multiple of {k}")
        tp = p.tensor_model_parallel_size
        widths = {"hidden_size": (m.hidden_size, m.hidden_size)}  # field: (value, per-rank GEMM width)
        if m.kv_channels is not None:  # else heads * head_dim is hidden_size
            widths["kv_channels"] = (m.kv_channels, m.kv_channels * m.num_attention_heads // tp)
        if m.first_k_dense_layers:
            ffn = m.ffn_hidden_size or 4 * m.hidden_size
            widths["ffn_hidden_size"] = (ffn, ffn // tp)
        if m.moe_shared_expert_intermediate_size is not None:
            shared = m.moe_shared_expert_intermediate_size
            widths["moe_shared_expert_intermediate_size"] = (shared, shared // tp)
        for name, (value, width) in widths.items():
            if width % k:
                _fail(f"model.{name}", value, f"{why} (per-rank GEMM width {width})")

    def check_machine(self) -> ExperimentConfig:
        """What this machine must offer for the config: run when training starts, not in validate()
        (which stays pure, so a laptop can dry-run an fp8 GPU config)."""
        import importlib.util

        from rexmoe_train import platform

        m, r = self.model, self.rexmoe
        if m.transformer_impl == "transformer_engine" and not platform.has_transformer_engine():
            _fail("model.transformer_impl", m.transformer_impl,
                  "needs Transformer Engine on a GPU (not available here); use local or auto")
        if self.train.fp8 is not None and m.resolved_transformer_impl() != "transformer_engine":
            _fail("train.fp8", self.train.fp8,
                  "needs Transformer Engine on a GPU (model.transformer_impl resolves to local here); "
                  "use train.fp8=null")
        if r.kernels == "triton" and importlib.util.find_spec("triton") is None:
            _fail("rexmoe.kernels", r.kernels, "needs triton (pip install triton); use auto or torch")
        return self

    def validate_layout(self, world_size: int) -> None:
        p, t = self.parallel, self.train
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % model_parallel:
            _fail("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size,
                  f"tp*pp ({model_parallel}) must divide the world size ({world_size})")
        expert_parallel = (p.expert_tensor_parallel_size * p.expert_model_parallel_size
                           * p.pipeline_model_parallel_size)
        if world_size % expert_parallel:
            _fail("parallel.expert_model_parallel_size", p.expert_model_parallel_size,
                  f"etp*ep*pp ({expert_parallel}) must divide the world size ({world_size})")
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            _fail("train.global_batch_size", t.global_batch_size,
                  f"must be a multiple of train.micro_batch_size * data-parallel size "
                  f"({t.micro_batch_size} * {dp})")
        if p.virtual_pipeline_model_parallel_size and (
            t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline_model_parallel_size:
            _fail("train.global_batch_size", t.global_batch_size,
                  "the number of micro-batches must be a multiple of "
                  "parallel.pipeline_model_parallel_size with interleaving")

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def reuse_plan(self) -> ReusePlan:
        """The model's reuse groups (core/reuse.py)."""
        m, r = self.model, self.rexmoe
        return ReusePlan(num_layers=m.num_layers, first_k_dense_layers=m.first_k_dense_layers,
                         reuse_group_size=r.reuse_group_size, experts_per_layer=m.num_moe_experts,
                         allow_partial_last_group=r.allow_partial_last_group)

    @property
    def psr_seed(self) -> int:
        return self.train.seed if self.rexmoe.psr.seed is None else self.rexmoe.psr.seed


# --------------------------------------------------------------------------------------------------
# dict -> dataclasses, with type checks that name the field
# --------------------------------------------------------------------------------------------------
def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, options[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            _fail(path, value, f"must be a mapping of {annotation.__name__} fields")
        return from_dict(annotation, value, path)
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(
                f"config error: unknown field {where!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(where, value, hints[key])
    return cls(**kwargs)


def experiment_from_dict(data: dict) -> ExperimentConfig:
    return from_dict(ExperimentConfig, data)
