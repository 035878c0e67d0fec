"""parallel/state.py: the default group, megatron's groups for a layout, and releasing them."""

from __future__ import annotations

import os

import torch.distributed as dist


def _live_groups() -> int:
    from torch.distributed import distributed_c10d

    return len(distributed_c10d._world.pg_map)


def _native_threads() -> int:
    """gloo's I/O threads are native: count the process's threads, not Python's."""
    return len(os.listdir("/proc/self/task"))


def test_init_model_parallel_builds_the_layout_and_destroy_releases_its_groups(megatron_world):
    from megatron.core import parallel_state

    from rexmoe_train.config.schema import ParallelConfig
    from rexmoe_train.parallel.state import destroy_model_parallel_groups, init_model_parallel

    assert _live_groups() == 1  # the fixture left only the default group
    threads_before = _native_threads()
    for _ in range(3):  # re-initialising alone (megatron's destroy) keeps the old groups alive
        init_model_parallel(ParallelConfig(), seed=1)
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_expert_model_parallel_world_size() == 1
    piled_up, threads_piled_up = _live_groups(), _native_threads()
    assert piled_up > 3 * 10, piled_up
    destroy_model_parallel_groups()
    assert _live_groups() == 1
    assert not parallel_state.model_parallel_is_initialized()
    assert dist.is_initialized() and dist.get_world_size() == 1
    threads_after = _native_threads()
    # the groups' threads are gone (a few torch worker threads started meanwhile may stay)
    assert threads_after < threads_before + (threads_piled_up - threads_before) // 4, \
        (threads_before, threads_piled_up, threads_after)
    init_model_parallel(ParallelConfig(), seed=1)  # and a new layout still builds afterwards
    assert parallel_state.get_data_parallel_world_size() == 1
