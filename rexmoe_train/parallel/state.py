"""Process group and megatron parallel_state setup: the one place parallelism is applied.

Works for a plain `python` process (world size 1, no launcher) and under torchrun/srun (reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from rexmoe_train import platform
from rexmoe_train.config.schema import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch's flight recorder (the last collectives of every group, dumped by resilience/watchdog.py on a
# hang) records only when this is set before the groups are made; a ring of 2000 small entries
FLIGHT_RECORDER_ENTRIES = "2000"


def init_distributed(timeout_minutes: float = 30, timeout_s: Optional[float] = None) -> tuple[int, int]:
    """Initialise the default process group if needed (collective timeout ``timeout_s``, else
    ``timeout_minutes``). Returns (rank, world_size)."""
    if not dist.is_initialized():
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun / srun: rendezvous from the environment
            dist.init_process_group(platform.dist_backend(), timeout=timeout)
        else:
            # a single process without a launcher. The environment is left alone on purpose: child
            # processes (a CLI run from a notebook or a test) must not inherit a half-set launcher env.
            dist.init_process_group(platform.dist_backend(), init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(parallel: ParallelConfig, seed: int, timeout_s: Optional[float] = None) -> None:
    """(Re)initialise megatron's model-parallel groups for this layout and seed its RNG tracker.
    ``timeout_s``: their collective timeout (megatron's default: 30 minutes)."""
    parallel_state.destroy_model_parallel()
    timeout = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
    parallel_state.initialize_model_parallel(
        **timeout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    # The host generator too, as Megatron-LM's _set_random_seed does: megatron builds some weights on
    # the CPU before they move to the GPU (the router's, "TODO: Add support for GPU initialization").
    # Without this, on a GPU they come from an unseeded generator: train.seed does not change them and
    # a second model in the process differs (tests/devicecheck). On CPU the tracker seeds it anyway.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def set_collective_timeout(timeout_s: float) -> int:
    """Set the collective timeout of every live process group (the default one and megatron's), e.g.
    from the long start-up timeout to the tighter training one. torch's ``_set_pg_timeout`` changes
    the gloo and NCCL backends' timeout for collectives issued from now on. Returns the groups set."""
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        return 0
    timeout = timedelta(seconds=timeout_s)
    groups = list(getattr(getattr(distributed_c10d, "_world", None), "pg_map", {})) or [dist.group.WORLD]
    done = 0
    for group in groups:
        try:
            distributed_c10d._set_pg_timeout(timeout, group)
            done += 1
        except ValueError:  # a group this rank is not a member of
            continue
    return done


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
