"""The ``model:`` section: the transformer and its MoE layers (Megatron-LM names)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from rexmoe_train.config.fields import (
    DROP_POLICIES,
    FP8_GEMM_MULTIPLE,
    NORMALIZATIONS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    TRANSFORMER_IMPLS,
    _at_least,
    _fail,
    _one_of,
    _positive,
)


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
    # BENCHMARK ONLY (never for training): megatron's flag of the same name; every router replaces its
    # logits by random normal ones (RandomSTE), so each token picks k candidates uniformly among those
    # PSR makes available and expert load is balanced whatever the weights (bench/gpu_bench.py).
    moe_router_force_load_balancing: bool = False
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
