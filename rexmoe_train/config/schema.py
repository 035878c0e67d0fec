"""Typed configuration: the composed Hydra config is turned into these dataclasses and validated
before anything is built, so a bad value fails in one line instead of deep inside megatron.

Field names follow Megatron-LM where one exists (``num_layers``, ``moe_router_topk``,
``expert_model_parallel_size``...). The ``rexmoe`` block holds what the method adds.

Each section lives in its own module: ``rexmoe.py``, ``model.py``, ``parallel.py``, ``train.py``
(train + data), ``run.py`` (run, checkpoint, resilience); ``fields.py`` holds the allowed values and the
one-line checks, ``coercion.py`` turns plain dicts into the dataclasses. This module keeps
``ExperimentConfig`` and every check that spans sections, and is the one import path callers use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rexmoe_train.config.coercion import from_dict
from rexmoe_train.config.fields import FP8_GEMM_MULTIPLE, FP8_RECIPES, _fail
from rexmoe_train.config.model import ModelConfig
from rexmoe_train.config.parallel import ParallelConfig
from rexmoe_train.config.rexmoe import BalanceConfig, PSRConfig, ReXMoEConfig
from rexmoe_train.config.run import CheckpointConfig, ResilienceConfig, RunConfig, WandbConfig
from rexmoe_train.config.train import DataConfig, TrainConfig
from rexmoe_train.core.errors import ConfigError
from rexmoe_train.core.reuse import ReusePlan

__all__ = [
    "BalanceConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FP8_RECIPES",
    "ModelConfig",
    "PSRConfig",
    "ParallelConfig",
    "ReXMoEConfig",
    "ResilienceConfig",
    "RunConfig",
    "TrainConfig",
    "WandbConfig",
    "experiment_from_dict",
]


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

    def padded_vocab_size(self, vocab_size: int) -> int:
        """The embedding / output rows megatron allocates: the vocabulary rounded up to a multiple of
        model.make_vocab_size_divisible_by x tensor-parallel size."""
        multiple = self.model.make_vocab_size_divisible_by * self.parallel.tensor_model_parallel_size
        return -(-vocab_size // multiple) * multiple

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


def experiment_from_dict(data: dict) -> ExperimentConfig:
    return from_dict(ExperimentConfig, data)
