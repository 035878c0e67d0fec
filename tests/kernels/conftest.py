"""Kernel tests: run the Triton kernels through the interpreter on CPU (see tests/conftest.py for
why triton itself is imported there, first, with TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest

from rexmoe_train import platform


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None when it can."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"
    if not isinstance(tl.max, InterpretedFunction):
        return ("triton.language was imported before TRITON_INTERPRET=1 was set (tests/conftest.py "
                "imports it first on CPU); the interpreter cannot run its standard library")
    return None


@pytest.fixture
def triton_cpu(monkeypatch):
    """Use in tests that launch Triton kernels on CPU tensors: skips with the reason when the
    interpreter is unavailable, and turns it on for this test only."""
    if platform.HAS_CUDA:
        pytest.skip("CUDA present: the GPU-marked tests cover the compiled kernels")
    reason = interpreter_problem()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
