"""Test fixtures shared by the suite, and how the suite shares the machine.

Single-process tests run under plain pytest (world size 1). The multi-process checks live in
tests/dist/ and run under torchrun, launched by tests/test_distributed.py: one launch runs many
checks, because every process pays ~7 s to import torch + megatron.

The suite runs on 2 pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadscope``; ``-n 0``
runs it in one process). Why 2 and by module: most tests are one Python thread on a tiny model, so a
second worker nearly halves their time on a 2-core machine, and a module stays on one worker so its
module-scoped reference runs are computed once. Each worker's torch uses one intra-op thread (two
workers with two spinning threads each would fight over two cores). Tests whose assertions are about
time (a budget, a straggler, a kill noticed within N s) are marked ``exclusive``: they run while the
other worker waits (a reader-writer lock on a file, with a gate so they are not starved), so another
test's load cannot make them fail. The heaviest modules are scheduled first so that neither worker is
left alone with a long tail.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

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

# No test is about wandb unless it says so (those set run.wandb.mode or drop this variable): offline
# wandb starts a service process per run, ~1.3 s of CPU and ~1.5 s of wall time for each of the
# suite's trainer processes. Every subprocess the suite starts inherits it. (config/run.py)
os.environ["WANDB_MODE"] = "disabled"

IN_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ

# Modules scheduled first (the longest; measured with --durations, docs/benchmarks.md): under
# --dist loadscope a worker takes one whole module at a time, in collection order (addopts turns off
# xdist's own reordering by test count, which put the two-test multi-process module last).
HEAVY_FIRST = (
    "tests/test_distributed.py", "tests/resilience/test_scenarios.py", "tests/resilience/test_elastic.py",
    "tests/devicecheck/test_strict_device.py", "tests/recipes/test_paper_small.py",
    "tests/training/test_checkpoint.py", "tests/cli/test_convert.py",
)


def _is_xdist_worker(config) -> bool:
    # not merely PYTEST_XDIST_WORKER in the environment: a pytest that a test starts (torchrun's
    # workers in tests/test_distributed.py) inherits it but is no worker of this session
    return hasattr(config, "workerinput")


def pytest_configure(config):
    if _is_xdist_worker(config):
        import torch

        torch.set_num_threads(1)

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

    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: else as collected
    if platform.HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# -- sharing the machine between xdist workers (see the module docstring) -----------------------------
_LOCKS: dict[str, object] = {}


def _lock_file(name: str):
    if name not in _LOCKS:
        folder = Path(tempfile.gettempdir()) / f"rexmoe-pytest-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'solo')}"
        folder.mkdir(exist_ok=True)
        _LOCKS[name] = open(folder / name, "a+")  # noqa: SIM115 -- held for the worker's life
    return _LOCKS[name]


@contextmanager
def machine_share(exclusive: bool):
    """Shared for ordinary tests, exclusive for ``exclusive`` ones. The gate is taken before the
    main lock by both kinds, and held by an exclusive test while it waits: a stream of ordinary tests
    on the other worker can then not keep it out for ever."""
    gate, main = _lock_file("gate"), _lock_file("main")
    fcntl.flock(gate, fcntl.LOCK_EX)
    try:
        fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    finally:
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(main, fcntl.LOCK_UN)
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around setup, call and teardown, so a module-scoped fixture built for the first test of an
    ``exclusive`` module runs under the lock too."""
    if not _is_xdist_worker(item.config):
        return (yield)
    with machine_share(item.get_closest_marker("exclusive") is not None):
        return (yield)
