"""Test fixtures shared by the suite.

Single-process tests run under plain pytest (world size 1). The multi-process checks live in
tests/dist/ and run under torchrun, launched by tests/test_distributed.py: one launch runs many
checks, because every process pays ~7 s to import torch + megatron.
"""

from __future__ import annotations

import os

import pytest

from rexmoe_train import compat


def _import_triton_for_the_interpreter() -> None:
    """tests/kernels runs the Triton kernels on CPU through TRITON_INTERPRET=1. triton reads that
    variable when a function is decorated, and its standard library (tl.max, tl.sum, ...) is decorated
    when triton.language is first imported, which torch._dynamo does as a side effect of any megatron
    import. So on a CUDA-less machine import triton here, first, with the variable set, then restore
    the environment: no other test or subprocess sees the variable, and on CPU compiled Triton cannot
    run anyway. The kernel tests set the variable again for their own duration (monkeypatch)."""
    from rexmoe_train import platform

    if platform.HAS_CUDA or "triton" in __import__("sys").modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except Exception:  # not installed: the kernel tests skip with a reason
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()

# Test modules import the megatron-facing packages at module level: the CPU layer goes in first, as
# the entry points install it.
compat.install()

IN_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ

# tests/dist needs a multi-process world; plain pytest skips collecting it.
collect_ignore = [] if IN_TORCHRUN else ["dist"]


@pytest.fixture
def megatron_world():
    """A gloo world (size 1 under plain pytest, the torchrun world under torchrun) with megatron's
    global MoE state reset before and after the test."""

    compat.install()
    from rexmoe_train.parallel.state import destroy_model_parallel_groups, init_distributed

    init_distributed()
    compat.reset_megatron_global_state()
    destroy_model_parallel_groups()  # the last test's groups: their gloo threads would pile up
    yield
    compat.reset_megatron_global_state()
    destroy_model_parallel_groups()


@pytest.fixture
def layout(megatron_world):
    """layout(parallel_config, seed) -> initialises megatron's model-parallel groups for it."""
    from rexmoe_train.parallel.state import init_model_parallel

    def init(parallel, seed: int = 1234):
        init_model_parallel(parallel, seed)

    return init


def pytest_collection_modifyitems(config, items):
    from rexmoe_train import platform

    if platform.HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
