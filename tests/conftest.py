"""Test fixtures shared by the suite.

Single-process tests run under plain pytest (world size 1). The multi-process checks live in
tests/dist/ and run under torchrun, launched by tests/test_distributed.py: one launch runs many
checks, because every process pays ~7 s to import torch + megatron.
"""

from __future__ import annotations

import os

import pytest

IN_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ

# tests/dist needs a multi-process world; plain pytest skips collecting it.
collect_ignore = [] if IN_TORCHRUN else ["dist"]


@pytest.fixture
def megatron_world():
    """A gloo world (size 1 under plain pytest, the torchrun world under torchrun) with megatron's
    global MoE state reset before and after the test."""
    from rexmoe_train import platform

    platform.setup()
    from rexmoe_train.parallel.state import init_distributed

    init_distributed()
    platform.reset_megatron_global_state()
    yield
    platform.reset_megatron_global_state()


@pytest.fixture
def layout(megatron_world):
    """layout(parallel_config, seed) -> initialises megatron's model-parallel groups for it."""
    from rexmoe_train.parallel.state import init_model_parallel

    def init(parallel, seed: int = 1234):
        init_model_parallel(parallel, seed)

    return init


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
