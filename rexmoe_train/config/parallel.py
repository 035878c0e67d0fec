"""The ``parallel:`` section: tensor / pipeline / expert / data parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rexmoe_train.config.fields import DISPATCHERS, _at_least, _fail, _one_of


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
