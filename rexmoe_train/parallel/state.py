"""Process group and megatron parallel_state setup: the one place parallelism is applied.

Works for a plain `python` process (world size 1, no launcher) and under torchrun/srun (reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from rexmoe_train import platform
from rexmoe_train.config.schema import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise the default process group if needed. Returns (rank, world_size)."""
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun / srun: rendezvous from the environment
            dist.init_process_group(platform.dist_backend(), timeout=timeout)
        else:
            # a single process without a launcher. The environment is left alone on purpose: child
            # processes (a CLI run from a notebook or a test) must not inherit a half-set launcher env.
            dist.init_process_group(platform.dist_backend(), init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """(Re)initialise megatron's model-parallel groups for this layout and seed its RNG tracker."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel_groups() -> None:
    """Drop megatron's groups AND destroy them, keeping only the default group.

    megatron's destroy_model_parallel only forgets its references; torch keeps every group alive
    (and each gloo group keeps its own I/O threads polling) until it is destroyed. A process that
    builds many layouts in turn (the test suite: ~40 groups per layout) otherwise accumulates
    thousands of threads that eat the CPU. Only call it when no model built on the old groups will
    run again."""
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank is done with the old groups before any rank tears its end down
    world = dist.group.WORLD
    # the registry of live groups is private; without it there is nothing to release, not an error
    for group in list(getattr(getattr(distributed_c10d, "_world", None), "pg_map", {})):
        if group is not world:
            dist.destroy_process_group(group)


def data_parallel_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
